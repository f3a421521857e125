//! What wasmgrid's payment-channel program (`paychan/`) and its callers agree on, byte for byte:
//! the channel account's layout, the instructions' encoding, the voucher a renter signs and the
//! program's error codes. Plain `core`, no dependency, so the host side (settlement, the fuzz
//! target, the LiteSVM tests) runs the same code the program runs on chain.
#![cfg_attr(not(test), no_std)]

/// The first bytes of every channel account: its kind and layout version.
pub const CHANNEL_MAGIC: [u8; 8] = *b"wgpaych1";

/// Domain separation of vouchers.
pub const VOUCHER_DOMAIN: &[u8; 17] = b"wasmgrid-paych-v1";

/// Seeds: `["channel", renter, provider, mint, id (u64 LE)]` and `["vault", channel]`.
pub const CHANNEL_SEED: &[u8] = b"channel";
pub const VAULT_SEED: &[u8] = b"vault";

/// The shortest and longest dispute window a channel may have, in seconds: long enough for a
/// provider's watcher to claim after a close starts, short enough that a renter whose provider
/// vanished gets its funds back within a week.
pub const MIN_WINDOW_SECS: i64 = 60;
pub const MAX_WINDOW_SECS: i64 = 7 * 24 * 3600;

/// The channel account's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Channel {
    pub renter: [u8; 32],
    pub provider: [u8; 32],
    /// The key whose signature makes a voucher (may differ from the renter's wallet).
    pub voucher_key: [u8; 32],
    pub mint: [u8; 32],
    pub vault: [u8; 32],
    pub id: u64,
    /// What the renter put in, all deposits together.
    pub deposited: u64,
    /// What the provider took out: the largest voucher claimed.
    pub claimed: u64,
    /// Unix time after which the renter may finalize; 0 while the channel is open.
    pub close_at: i64,
    pub window: i64,
    /// The slot the channel was opened in: a voucher names it, so vouchers of an earlier
    /// channel at the same address never pay again.
    pub generation: u64,
    pub bump: u8,
    pub vault_bump: u8,
}

impl Channel {
    pub const LEN: usize = 8 + 32 * 5 + 8 * 6 + 2 + 6;

    pub fn encode(&self, out: &mut [u8]) -> Result<(), Error> {
        let out = out.get_mut(..Channel::LEN).ok_or(Error::AccountTooSmall)?;
        let mut w = Writer { out, at: 0 };
        w.put(&CHANNEL_MAGIC);
        for k in [&self.renter, &self.provider, &self.voucher_key, &self.mint, &self.vault] {
            w.put(k);
        }
        for v in [self.id, self.deposited, self.claimed] {
            w.put(&v.to_le_bytes());
        }
        w.put(&self.close_at.to_le_bytes());
        w.put(&self.window.to_le_bytes());
        w.put(&self.generation.to_le_bytes());
        w.put(&[self.bump, self.vault_bump, 0, 0, 0, 0, 0, 0]);
        Ok(())
    }

    pub fn decode(data: &[u8]) -> Result<Channel, Error> {
        let mut r = Reader { data: data.get(..Channel::LEN).ok_or(Error::NotAChannel)?, at: 0 };
        if r.array::<8>()? != CHANNEL_MAGIC {
            return Err(Error::NotAChannel);
        }
        let c = Channel {
            renter: r.array()?,
            provider: r.array()?,
            voucher_key: r.array()?,
            mint: r.array()?,
            vault: r.array()?,
            id: r.u64()?,
            deposited: r.u64()?,
            claimed: r.u64()?,
            close_at: r.u64()? as i64,
            window: r.u64()? as i64,
            generation: r.u64()?,
            bump: r.u8()?,
            vault_bump: r.u8()?,
        };
        Ok(c)
    }

    /// The exact bytes a voucher's Ed25519 signature covers: domain, program, channel,
    /// generation, mint, cumulative amount, and the digest of the provider's receipt it answers.
    pub fn voucher_message(
        program: &[u8; 32],
        channel: &[u8; 32],
        generation: u64,
        mint: &[u8; 32],
        cumulative: u64,
        receipt_digest: &[u8; 32],
    ) -> [u8; VOUCHER_LEN] {
        let mut out = [0u8; VOUCHER_LEN];
        let mut w = Writer { out: &mut out, at: 0 };
        w.put(VOUCHER_DOMAIN);
        w.put(program);
        w.put(channel);
        w.put(&generation.to_le_bytes());
        w.put(mint);
        w.put(&cumulative.to_le_bytes());
        w.put(receipt_digest);
        out
    }
}

/// Length of a voucher message.
pub const VOUCHER_LEN: usize = 17 + 32 + 32 + 8 + 32 + 8 + 32;

/// The program's instructions, as their data encodes them (a tag byte, then fixed fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// Accounts: renter (signer, writable), provider, mint, channel (writable), vault
    /// (writable), renter's token account (writable), token program, system program.
    Open { id: u64, deposit: u64, window: i64, voucher_key: [u8; 32] },
    /// Accounts: renter (signer), channel (writable), vault (writable), renter's token account
    /// (writable), token program.
    TopUp { amount: u64 },
    /// Accounts: channel (writable), vault (writable), provider's token account (writable),
    /// instructions sysvar, token program. The instruction before it must be the Ed25519
    /// program's check of the voucher key's signature over the voucher message.
    Claim { cumulative: u64, receipt_digest: [u8; 32] },
    /// Accounts: renter (signer), channel (writable).
    StartClose,
    /// Accounts: renter (signer, writable), channel (writable), vault (writable), renter's token
    /// account (writable), token program.
    Finalize,
    /// Accounts: provider (signer), renter (writable), channel (writable), vault (writable),
    /// renter's token account (writable), token program.
    CooperativeClose,
}

impl Instruction {
    /// The longest instruction data.
    pub const MAX_LEN: usize = 1 + 8 + 8 + 8 + 32;

    pub fn decode(data: &[u8]) -> Result<Instruction, Error> {
        let (&tag, rest) = data.split_first().ok_or(Error::BadInstruction)?;
        let mut r = Reader { data: rest, at: 0 };
        let ix = match tag {
            0 => {
                Instruction::Open { id: r.u64()?, deposit: r.u64()?, window: r.u64()? as i64, voucher_key: r.array()? }
            }
            1 => Instruction::TopUp { amount: r.u64()? },
            2 => Instruction::Claim { cumulative: r.u64()?, receipt_digest: r.array()? },
            3 => Instruction::StartClose,
            4 => Instruction::Finalize,
            5 => Instruction::CooperativeClose,
            _ => return Err(Error::BadInstruction),
        };
        // Trailing bytes are refused: one encoding per instruction.
        if r.at != rest.len() {
            return Err(Error::BadInstruction);
        }
        Ok(ix)
    }

    /// Writes the instruction's data; returns its length.
    pub fn encode(&self, out: &mut [u8; Instruction::MAX_LEN]) -> usize {
        let mut w = Writer { out, at: 0 };
        match *self {
            Instruction::Open { id, deposit, window, voucher_key } => {
                w.put(&[0]);
                w.put(&id.to_le_bytes());
                w.put(&deposit.to_le_bytes());
                w.put(&window.to_le_bytes());
                w.put(&voucher_key);
            }
            Instruction::TopUp { amount } => {
                w.put(&[1]);
                w.put(&amount.to_le_bytes());
            }
            Instruction::Claim { cumulative, receipt_digest } => {
                w.put(&[2]);
                w.put(&cumulative.to_le_bytes());
                w.put(&receipt_digest);
            }
            Instruction::StartClose => w.put(&[3]),
            Instruction::Finalize => w.put(&[4]),
            Instruction::CooperativeClose => w.put(&[5]),
        }
        w.at
    }
}

/// Every way the program refuses, as its custom error code (`ProgramError::Custom`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Error {
    BadInstruction = 1,
    NotAChannel = 2,
    AccountTooSmall = 3,
    /// A required signature is missing.
    NotSigned = 4,
    /// An account is not the one the channel (or its seeds) name.
    WrongAccount = 5,
    /// An account that must be writable is not.
    NotWritable = 6,
    /// An account is owned by another program than it must be.
    WrongOwner = 7,
    WrongMint = 8,
    WindowOutOfRange = 9,
    ZeroAmount = 10,
    /// The voucher is not above what was claimed, or above what was deposited.
    VoucherAmount = 11,
    /// The instruction before a claim is not a check of the voucher's signature.
    NoVoucherSignature = 12,
    /// The voucher's signature check covers other bytes, or another key, than it must.
    VoucherMismatch = 13,
    AlreadyClosing = 14,
    NotClosing = 15,
    /// The dispute window has not ended.
    TooEarly = 16,
    /// The dispute window has ended: only the renter's finalize is left.
    TooLate = 17,
    Overflow = 18,
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    /// Callers size `out` to what they write; a short buffer is a bug, and writes nothing.
    fn put(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.out.get_mut(self.at..self.at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        self.at += bytes.len();
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let bytes = self.data.get(self.at..self.at + N).ok_or(Error::BadInstruction)?;
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_round_trip_and_refuse_every_other_encoding() {
        let all = [
            Instruction::Open { id: 7, deposit: 1_000, window: 3600, voucher_key: [9; 32] },
            Instruction::TopUp { amount: 5 },
            Instruction::Claim { cumulative: 42, receipt_digest: [3; 32] },
            Instruction::StartClose,
            Instruction::Finalize,
            Instruction::CooperativeClose,
        ];
        for ix in all {
            let mut buf = [0u8; Instruction::MAX_LEN];
            let n = ix.encode(&mut buf);
            assert_eq!(Instruction::decode(&buf[..n]), Ok(ix));
            assert_eq!(Instruction::decode(&buf[..n - 1]), Err(Error::BadInstruction), "{ix:?} cut short");
            let mut longer = buf[..n].to_vec();
            longer.push(0);
            assert_eq!(Instruction::decode(&longer), Err(Error::BadInstruction), "{ix:?} with a trailing byte");
        }
        assert_eq!(Instruction::decode(&[]), Err(Error::BadInstruction));
        assert_eq!(Instruction::decode(&[6]), Err(Error::BadInstruction));
    }

    #[test]
    fn a_channel_round_trips_and_other_data_is_not_a_channel() {
        let c = Channel {
            renter: [1; 32],
            provider: [2; 32],
            voucher_key: [3; 32],
            mint: [4; 32],
            vault: [5; 32],
            id: 6,
            deposited: 7,
            claimed: 8,
            close_at: -9,
            window: 10,
            generation: 11,
            bump: 12,
            vault_bump: 13,
        };
        let mut data = [0u8; Channel::LEN];
        c.encode(&mut data).unwrap();
        assert_eq!(Channel::decode(&data), Ok(c));
        assert_eq!(Channel::decode(&data[..Channel::LEN - 1]), Err(Error::NotAChannel));
        data[0] ^= 1;
        assert_eq!(Channel::decode(&data), Err(Error::NotAChannel));
        assert_eq!(c.encode(&mut [0u8; 10]), Err(Error::AccountTooSmall));
    }

    #[test]
    fn the_voucher_message_has_a_fixed_layout() {
        let m = Channel::voucher_message(&[1; 32], &[2; 32], 3, &[4; 32], 5, &[6; 32]);
        assert!(m.starts_with(VOUCHER_DOMAIN));
        assert_eq!(&m[17 + 64..17 + 72], &3u64.to_le_bytes());
        assert_eq!(&m[VOUCHER_LEN - 40..VOUCHER_LEN - 32], &5u64.to_le_bytes());
        assert_eq!(&m[VOUCHER_LEN - 32..], &[6; 32]);
    }
}
