//! The money commands and flags: `chain` (a local chain behind JSON-RPC), `earnings`,
//! `spend`, and the payment flags of `host` and `session`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::Args;
use proto::{Keypair, PublicKey};
use serde_json::{Value, json};
use settlement::ledger::{Book, Role};
use settlement::{Chain, Policy};

use crate::{Exit, bad_input, exit};

/// Where ledgers live unless told: `$XDG_DATA_HOME/wasmgrid` or `~/.local/share/wasmgrid`.
fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("wasmgrid")
}

/// A chain to settle on and the mint payments are in.
type ChainAndMint = (Arc<dyn Chain>, PublicKey);

/// The chain and the payment token.
#[derive(Args, Debug, Clone)]
pub(crate) struct ChainArgs {
    /// A Solana JSON-RPC endpoint (a cluster, or `wasmgrid chain`); without it sessions are
    /// not paid.
    #[arg(long, value_name = "URL", env = "WASMGRID_RPC_URL")]
    rpc_url: Option<String>,
    /// The SPL mint payments are in (base58).
    #[arg(long, value_name = "MINT", env = "WASMGRID_MINT")]
    mint: Option<PublicKey>,
    /// The payment-channel program's address on that chain (where `wasmgrid chain deploy` put
    /// it); the default is where `wasmgrid chain` loads it.
    #[arg(long, value_name = "ADDRESS", env = "WASMGRID_PROGRAM_ID")]
    program_id: Option<proto::Address>,
}

impl ChainArgs {
    /// The payment-channel program.
    pub(crate) fn program(&self) -> proto::Address {
        self.program_id.unwrap_or_else(|| settlement::wire_address(&settlement::channel::LOCAL_PROGRAM_ID))
    }

    /// The chain and mint, when paying; an error when only one of them is given.
    fn chain(&self) -> Result<Option<ChainAndMint>, Exit> {
        match (&self.rpc_url, self.mint) {
            (None, None) => Ok(None),
            (Some(url), Some(mint)) => Ok(Some((rpc(url)?, mint))),
            (Some(_), None) => Err(bad_input(anyhow!("--rpc-url needs --mint: the SPL mint payments are in"))),
            (None, Some(_)) => Err(bad_input(anyhow!("--mint needs --rpc-url: the chain the mint is on"))),
        }
    }
}

fn rpc(url: &str) -> Result<Arc<dyn Chain>, Exit> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad_input(anyhow!("--rpc-url {url:?} is not an http:// or https:// URL")));
    }
    Ok(Arc::new(settlement::rpc::RpcChain::new(url)))
}

/// How a provider is paid.
#[derive(Args, Debug)]
pub(crate) struct HostPayArgs {
    #[command(flatten)]
    chain: ChainArgs,
    /// When to claim from a payment channel: end (when a session ends), every (inference),
    /// every:N, every:30s, or over:AMOUNT. Whatever it says, a channel whose renter starts a
    /// close is claimed at once.
    #[arg(long, value_name = "POLICY", default_value = "end", alias = "settle")]
    claim: Policy,
    /// Calls served past the newest valid voucher before a session stops: a paid session's
    /// receipts, each answered by a voucher, come every this many calls.
    #[arg(
        long,
        value_name = "N",
        default_value_t = provider::payment::DEFAULT_MAX_UNVOUCHED,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_unvouched: u64,
    /// The provider's ledger (read by `wasmgrid earnings`).
    #[arg(long, value_name = "DIR")]
    ledger: Option<PathBuf>,
    /// A paid batch job gets a receipt every this much of its time (e.g. 10s, 500ms) and is
    /// stopped when one is not answered by a voucher within the next.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::units::parse_duration)]
    job_slice: std::time::Duration,
}

impl HostPayArgs {
    pub(crate) fn payment(&self) -> Result<Option<provider::payment::PaymentConfig>, Exit> {
        let Some((chain, mint)) = self.chain.chain()? else {
            log::warn!("no --rpc-url: inference sessions are served unpaid");
            return Ok(None);
        };
        Ok(Some(provider::payment::PaymentConfig {
            chain,
            program: self.chain.program(),
            mint,
            policy: self.claim,
            max_unvouched: self.max_unvouched,
            ledger: Some(self.ledger.clone().unwrap_or_else(|| data_dir().join("earnings"))),
            channels: Default::default(),
            job_slice: self.job_slice,
        }))
    }
}

/// How a renter pays.
#[derive(Args, Debug)]
pub(crate) struct SessionPayArgs {
    #[command(flatten)]
    chain: ChainArgs,
    /// Tokens a new payment channel with a provider gets, and what it is topped up to before
    /// a session once half of it is spent.
    #[arg(long, value_name = "AMOUNT", alias = "budget")]
    deposit: Option<u64>,
    /// Which of this renter's channels with the provider pays (another for a second session
    /// with the same provider at the same time). A paid cluster of N takes this id and those
    /// after it, one per member (up to 2N while a retry overlaps the try before).
    #[arg(long, value_name = "N", default_value_t = 0)]
    channel_id: u64,
    /// The renter's ledger (read by `wasmgrid spend`).
    #[arg(long, value_name = "DIR")]
    ledger: Option<PathBuf>,
}

impl SessionPayArgs {
    pub(crate) fn payment(&self) -> Result<Option<client::Payment>, Exit> {
        let Some((chain, mint)) = self.chain.chain()? else {
            if self.deposit.is_some() {
                return Err(bad_input(anyhow!("--deposit needs --rpc-url and --mint")));
            }
            return Ok(None);
        };
        let deposit = self.deposit.filter(|b| *b > 0).ok_or_else(|| {
            bad_input(anyhow!("a paid session needs --deposit: what its payment channel holds, in token units"))
        })?;
        Ok(Some(client::Payment {
            chain,
            program: self.chain.program(),
            mint,
            deposit,
            channel_id: self.channel_id,
            ledger: Some(self.ledger.clone().unwrap_or_else(|| data_dir().join("spend"))),
        }))
    }
}

impl SessionPayArgs {
    /// How a renter pays for batch jobs: a channel with the job's provider holds at least what
    /// the job may cost at its wall-time limit (`--deposit` when more).
    pub(crate) fn job_payment(&self) -> Result<Option<client::Payment>, Exit> {
        let Some((chain, mint)) = self.chain.chain()? else {
            if self.deposit.is_some() {
                return Err(bad_input(anyhow!("--deposit needs --rpc-url and --mint")));
            }
            return Ok(None);
        };
        Ok(Some(client::Payment {
            chain,
            program: self.chain.program(),
            mint,
            deposit: self.deposit.unwrap_or(0),
            channel_id: self.channel_id,
            ledger: Some(self.ledger.clone().unwrap_or_else(|| data_dir().join("spend"))),
        }))
    }
}

/// What a closed session cost, for `session`'s summary: the amount its vouchers cover and the
/// claims the provider said it made (`wasmgrid spend` shows what the chain holds).
pub(crate) fn spend_summary(books: &[Book]) -> Value {
    json!({
        "vouched": books.iter().map(|b| b.vouched).sum::<u64>(),
        "claims": books.iter().flat_map(|b| b.claims.clone()).collect::<Vec<_>>(),
        "channels": books.iter().map(|b| b.channel.to_string()).collect::<Vec<_>>(),
    })
}

// ---- wasmgrid chain ----

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ChainCmdArgs {
    #[command(subcommand)]
    action: Option<ChainAction>,
    /// Where to answer JSON-RPC.
    #[arg(long, default_value = "127.0.0.1:8899")]
    listen: SocketAddr,
    /// Keys to give 10 SOL and `--tokens` of the mint (base58, repeatable).
    #[arg(long, value_name = "KEY")]
    fund: Vec<PublicKey>,
    /// Token units each funded key gets (the mint has 6 decimals).
    #[arg(long, default_value_t = 100_000_000)]
    tokens: u64,
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum ChainAction {
    /// Deploy the payment-channel program (the one this binary was built with) to a cluster
    /// through the upgradeable loader; prints its program id for hosts' and renters'
    /// `--program-id`.
    Deploy(DeployArgs),
}

#[derive(Args, Debug)]
pub(crate) struct DeployArgs {
    /// The cluster's JSON-RPC endpoint.
    #[arg(long, value_name = "URL", env = "WASMGRID_RPC_URL")]
    rpc_url: String,
    /// The keypair that pays for the deployment (rent and fees) and holds the upgrade
    /// authority (Solana CLI JSON format).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The program's keypair: its public key is the program id (created if missing).
    #[arg(long, value_name = "FILE")]
    program_key: Option<PathBuf>,
}

/// `wasmgrid chain deploy`.
fn deploy(args: &DeployArgs) -> Result<u8, Exit> {
    let chain = rpc(&args.rpc_url)?;
    let payer =
        Keypair::read(&args.key).with_context(|| format!("reading {}", args.key.display())).map_err(bad_input)?;
    let program = match &args.program_key {
        Some(path) => crate::market::key_or_create(path).map_err(bad_input)?,
        None => Keypair::generate(),
    };
    eprintln!(
        "deploying the payment-channel program ({} bytes) as {} through the upgradeable loader, paid by {}",
        settlement::channel::PROGRAM_ELF.len(),
        program.public(),
        payer.public()
    );
    let done = settlement::channel::deploy(
        chain.as_ref(),
        &settlement::signer(&payer),
        &settlement::signer(&program),
        settlement::channel::PROGRAM_ELF,
    )
    .map_err(|e| Exit { code: exit::HOST, error: anyhow!("deploying the program: {e}") })?;
    println!(
        "{}",
        json!({ "program_id": done.program.to_string(), "transactions": done.transactions,
                "upgrade_authority": payer.public().to_string() })
    );
    Ok(exit::OK)
}

/// `wasmgrid chain`: an in-process chain (LiteSVM) with a payment mint, behind JSON-RPC, so
/// separate processes can settle on one local chain.
pub(crate) fn chain(args: &ChainCmdArgs) -> Result<u8, Exit> {
    if let Some(ChainAction::Deploy(d)) = &args.action {
        return deploy(d);
    }
    crate::market::init_logging();
    let fail = |e: anyhow::Error| Exit { code: exit::HOST, error: e };
    let local = Arc::new(settlement::LocalChain::new());
    let mint = fund(local.as_ref(), &args.fund, args.tokens).map_err(fail)?;
    let rt = crate::market::runtime()?;
    rt.block_on(async {
        let addr = settlement::rpc::serve(local, args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))
            .map_err(bad_input)?;
        println!("{}", json!({ "rpc_url": format!("http://{addr}"), "mint": mint.to_string(), "decimals": 6 }));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await;
        Ok(exit::OK)
    })
}

/// A new 6-decimal mint; each key gets SOL for fees and `tokens` in its token account.
fn fund(chain: &dyn Chain, keys: &[PublicKey], tokens: u64) -> anyhow::Result<settlement::solana::Pubkey> {
    use settlement::solana::Signer;
    let issuer = settlement::solana::Keypair::new();
    chain.airdrop(&issuer.pubkey(), 1_000_000_000_000)?;
    let mint = settlement::token::create_mint(chain, &issuer, &issuer.pubkey(), 6)?;
    for key in keys {
        let owner = settlement::address(key);
        chain.airdrop(&owner, 10_000_000_000)?;
        let account = settlement::token::ensure_token_account(chain, &issuer, &owner, &mint)?;
        settlement::token::mint_to(chain, &issuer, &mint, &account, tokens)?;
    }
    Ok(mint)
}

// ---- wasmgrid earnings / spend ----

#[derive(Args, Debug)]
pub(crate) struct LedgerArgs {
    /// The ledger folder (default: the one `host` or `session` writes).
    #[arg(long, value_name = "DIR")]
    ledger: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Read each channel's deposit and claims from this chain (without it: as last seen).
    #[arg(long, value_name = "URL", env = "WASMGRID_RPC_URL")]
    rpc_url: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct SpendArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// Close this renter's payment channels: start the close of each open one (the provider
    /// has the dispute window to claim), and finalize each whose window has ended (the rest
    /// comes back). Needs --rpc-url and --key.
    #[arg(long)]
    close: bool,
    /// Only this channel (its address, base58).
    #[arg(long, value_name = "ADDRESS")]
    channel: Option<proto::Address>,
    /// The renter's keypair, for --close.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

fn read_books(dir: &Path, role: Role) -> Result<Vec<Book>, Exit> {
    let (books, bad) = settlement::ledger::load(dir)
        .with_context(|| format!("reading the ledger {}", dir.display()))
        .map_err(bad_input)?;
    for (path, e) in bad {
        eprintln!("skipping {}: {e}", path.display());
    }
    Ok(books.into_iter().filter(|b| b.role == role).collect())
}

/// The channel files under a ledger, of a provider (`Payee`) or a renter (`Payer`).
fn read_channels<T>(
    loaded: std::io::Result<(Vec<T>, settlement::ledger::Unreadable)>,
    dir: &Path,
) -> Result<Vec<T>, Exit> {
    let (channels, bad) = loaded.with_context(|| format!("reading the ledger {}", dir.display())).map_err(bad_input)?;
    for (path, e) in bad {
        eprintln!("skipping {}: {e}", path.display());
    }
    Ok(channels)
}

fn session_json(b: &Book) -> Value {
    json!({
        "session": b.session,
        "renter": b.renter.to_string(),
        "provider": b.provider.to_string(),
        "device": b.device,
        "mint": b.mint.to_string(),
        "channel": b.channel.to_string(),
        "inferences": b.inferences,
        "price_per_inference": b.price_per_inference,
        "amount_due": b.amount_due,
        "vouched": b.vouched,
        "pending": b.pending(),
        "closed": b.closed,
        "claims": b.claims,
    })
}

/// A channel as the chain shows it now, when a chain was given and answers.
fn on_chain(
    chain: Option<&Arc<dyn Chain>>,
    ids: &settlement::Ids,
) -> Option<Result<Option<settlement::channel::OnChain>, String>> {
    chain.map(|c| settlement::channel::read(c.as_ref(), &ids.channel()).map_err(|e| e.to_string()))
}

/// `wasmgrid earnings`: a provider's takings per device and session (by the renter's vouchers)
/// and per channel (claimed, by the chain; vouched, by the renter's signature it holds).
pub(crate) fn earnings(args: &LedgerArgs) -> Result<u8, Exit> {
    let dir = args.ledger.clone().unwrap_or_else(|| data_dir().join("earnings"));
    let books = read_books(&dir, Role::Provider)?;
    let payees = read_channels(settlement::ledger::load_channels::<settlement::Payee>(&dir), &dir)?;
    let chain = args.rpc_url.as_deref().map(rpc).transpose()?;
    let mut devices: std::collections::BTreeMap<&str, (u64, u64, u64, u64)> = Default::default();
    for b in &books {
        let d = devices.entry(b.device.as_str()).or_default();
        *d = (d.0 + 1, d.1 + b.inferences, d.2 + b.vouched, d.3 + b.pending());
    }
    let channels: Vec<Value> = payees
        .iter()
        .map(|p| {
            let (claimed, deposited, closing, source) = match on_chain(chain.as_ref(), &p.ids) {
                Some(Ok(Some(on))) if on.state.generation == p.generation => {
                    (on.state.claimed, on.state.deposited, on.closing(), "chain")
                }
                Some(Ok(_)) => (p.claimed, p.deposited, true, "chain: closed"),
                Some(Err(_)) | None => (p.claimed, p.deposited, p.closing(), "last seen"),
            };
            json!({ "channel": p.address.to_string(), "renter": p.ids.renter.to_string(), "deposited": deposited,
                    "claimed": claimed, "vouched": p.vouched(), "unclaimed": p.vouched().saturating_sub(claimed),
                    "closing": closing, "source": source, "claims": p.claim_count, "last_claim": p.claims.last() })
        })
        .collect();
    let claimed: u64 = channels.iter().filter_map(|c| c["claimed"].as_u64()).sum();
    let unclaimed: u64 = channels.iter().filter_map(|c| c["unclaimed"].as_u64()).sum();
    if args.json {
        let devices: Vec<Value> = devices
            .iter()
            .map(|(name, (n, inf, vouched, pending))| {
                json!({ "device": name, "sessions": n, "inferences": inf, "vouched": vouched, "pending": pending })
            })
            .collect();
        println!(
            "{}",
            json!({ "ledger": dir.display().to_string(), "claimed": claimed, "unclaimed": unclaimed,
                    "devices": devices, "channels": channels,
                    "sessions": books.iter().map(session_json).collect::<Vec<_>>() })
        );
        return Ok(exit::OK);
    }
    println!("earnings in {}: {claimed} claimed, {unclaimed} vouched and not yet claimed (token units)", dir.display());
    println!("{:<36} {:>8} {:>11} {:>12} {:>10}", "device", "sessions", "inferences", "vouched", "pending");
    for (name, (n, inf, vouched, pending)) in &devices {
        println!("{name:<36} {n:>8} {inf:>11} {vouched:>12} {pending:>10}");
    }
    println!();
    println!(
        "{:<46} {:<12} {:>10} {:>10} {:>10} {:>7}  source",
        "channel", "renter", "deposited", "claimed", "unclaimed", "claims"
    );
    for c in &channels {
        println!(
            "{:<46} {:<12} {:>10} {:>10} {:>10} {:>7}  {}",
            c["channel"].as_str().unwrap_or(""),
            c["renter"].as_str().map_or(String::new(), short_text),
            c["deposited"],
            c["claimed"],
            c["unclaimed"],
            c["claims"],
            c["source"].as_str().unwrap_or("")
        );
    }
    Ok(exit::OK)
}

/// `wasmgrid spend`: what a renter owes and paid, per channel (deposited and claimed, by the
/// chain; vouched, by its own signatures) and per session; `--close` closes its channels.
pub(crate) fn spend(args: &SpendArgs) -> Result<u8, Exit> {
    let dir = args.ledger.ledger.clone().unwrap_or_else(|| data_dir().join("spend"));
    let books = read_books(&dir, Role::Renter)?;
    let mut payers = read_channels(settlement::ledger::load_channels::<settlement::Payer>(&dir), &dir)?;
    if let Some(only) = args.channel {
        payers.retain(|p| p.address == only);
        if payers.is_empty() {
            return Err(bad_input(anyhow!("no channel {only} in the ledger {}", dir.display())));
        }
    }
    let chain = args.ledger.rpc_url.as_deref().map(rpc).transpose()?;
    if args.close {
        let chain = chain
            .clone()
            .ok_or_else(|| bad_input(anyhow!("--close needs --rpc-url: the chain the channels are on")))?;
        let key = args.key.as_deref().ok_or_else(|| bad_input(anyhow!("--close needs --key: the renter's keypair")))?;
        let renter = Keypair::read(key).with_context(|| format!("reading {}", key.display())).map_err(bad_input)?;
        close_channels(chain.as_ref(), &renter, &dir, &mut payers)?;
    }
    let channels: Vec<Value> = payers
        .iter()
        .map(|p| {
            let (deposited, claimed, close_at, state) = match on_chain(chain.as_ref(), &p.ids) {
                Some(Ok(Some(on))) if on.state.generation == p.generation => {
                    let state = if on.closing() { "closing" } else { "open" };
                    (on.state.deposited, on.state.claimed, on.state.close_at, state)
                }
                Some(Ok(_)) => (p.deposited, p.claimed, p.close_at, "closed"),
                Some(Err(_)) | None => (p.deposited, p.claimed, p.close_at, "as last seen"),
            };
            json!({ "channel": p.address.to_string(), "provider": p.ids.provider.to_string(), "deposited": deposited,
                    "claimed": claimed, "vouched": p.vouched, "locked": deposited.saturating_sub(claimed),
                    "state": state, "close_at": close_at, "transactions": p.transactions })
        })
        .collect();
    let claimed: u64 = channels.iter().filter_map(|c| c["claimed"].as_u64()).sum();
    let vouched: u64 = payers.iter().map(|p| p.vouched).sum();
    let locked: u64 = channels.iter().filter(|c| c["state"] != "closed").filter_map(|c| c["locked"].as_u64()).sum();
    if args.ledger.json {
        println!(
            "{}",
            json!({ "ledger": dir.display().to_string(), "claimed": claimed, "vouched": vouched, "in_channels": locked,
                    "channels": channels, "sessions": books.iter().map(session_json).collect::<Vec<_>>() })
        );
        return Ok(exit::OK);
    }
    println!(
        "spend in {}: {vouched} vouched, {claimed} of it claimed by providers, {locked} still in open channels (token units)",
        dir.display()
    );
    println!("{:<46} {:<12} {:>10} {:>10} {:>10}  state", "channel", "provider", "deposited", "vouched", "claimed");
    for (c, p) in channels.iter().zip(&payers) {
        println!(
            "{:<46} {:<12} {:>10} {:>10} {:>10}  {}",
            c["channel"].as_str().unwrap_or(""),
            short(&p.ids.provider),
            c["deposited"],
            p.vouched,
            c["claimed"],
            c["state"].as_str().unwrap_or("")
        );
    }
    println!();
    println!(
        "{:<32} {:<12} {:>10} {:>7} {:>8} {:>8}",
        "session", "provider", "inferences", "price", "vouched", "pending"
    );
    for b in &books {
        println!(
            "{:<32} {:<12} {:>10} {:>7} {:>8} {:>8}",
            b.session,
            short(&b.provider),
            b.inferences,
            b.price_per_inference,
            b.vouched,
            b.pending()
        );
    }
    Ok(exit::OK)
}

/// `spend --close`: starts the close of every open channel and finalizes every channel whose
/// dispute window has ended, saying which is which.
fn close_channels(
    chain: &dyn Chain,
    renter: &Keypair,
    dir: &Path,
    payers: &mut [settlement::Payer],
) -> Result<(), Exit> {
    let now = settlement::channel::chain_time(chain)
        .map_err(|e| Exit { code: exit::HOST, error: anyhow!("reading the chain's clock: {e}") })?;
    let mut failed = None;
    for p in payers.iter_mut() {
        if p.ids.renter != renter.public() {
            eprintln!("channel {}: not this key's (renter {}); skipped", p.address, p.ids.renter);
            continue;
        }
        let step = match p.refresh(chain) {
            Ok(None) => {
                eprintln!("channel {}: closed", p.address);
                continue;
            }
            Ok(Some(on)) if on.state.generation != p.generation => {
                eprintln!("channel {}: closed (and opened again since)", p.address);
                continue;
            }
            Ok(Some(on)) if !on.closing() => p.start_close(chain, renter).map(|()| {
                format!(
                    "close started: the provider may claim until {}; run this again after that to finalize",
                    p.close_at
                )
            }),
            Ok(Some(on)) if on.state.close_at > now => {
                Ok(format!("closing: finalize after {} ({} s from now)", on.state.close_at, on.state.close_at - now))
            }
            Ok(Some(on)) => p
                .finalize(chain, renter)
                .map(|()| format!("finalized: {} came back", on.state.deposited.saturating_sub(on.state.claimed))),
            Err(e) => Err(e),
        };
        match step {
            Ok(what) => eprintln!("channel {}: {what}", p.address),
            Err(e) => {
                eprintln!("channel {}: {e}", p.address);
                failed = Some(e);
            }
        }
        if let Err(e) = settlement::ledger::save_payer(dir, p, true) {
            eprintln!("writing the ledger in {}: {e}", dir.display());
        }
    }
    match failed {
        Some(e) => Err(Exit { code: exit::HOST, error: anyhow!("closing channels: {e}") }),
        None => Ok(()),
    }
}

fn short(k: &PublicKey) -> String {
    short_text(&k.to_string())
}

fn short_text(s: &str) -> String {
    format!("{}..", s.get(..10).unwrap_or(s))
}
