//! The money commands and flags: `chain` (a local chain behind JSON-RPC), `earnings`,
//! `spend`, and the payment flags of `host` and `session`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::Args;
use proto::PublicKey;
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

/// A scheduler's chain for job payments and the token they are in.
type JobPayments = (Arc<dyn Chain>, scheduler::JobPricing);

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
}

impl ChainArgs {
    /// The chain and mint, when paying.
    pub(crate) fn chain_and_mint(&self) -> Result<Option<ChainAndMint>, Exit> {
        self.chain()
    }

    /// For a scheduler: the chain job payments go to, and the mint with its decimals (read from
    /// the chain, which also checks that the mint exists there).
    pub(crate) fn job_payments(&self) -> Result<Option<JobPayments>, Exit> {
        let Some((chain, mint)) = self.chain()? else { return Ok(None) };
        let decimals = settlement::token::mint_decimals(chain.as_ref(), &settlement::address(&mint))
            .map_err(|e| bad_input(anyhow!("--mint {mint}: {e}")))?;
        Ok(Some((chain, scheduler::JobPricing { mint, decimals })))
    }

    /// The chain and mint, when paying; an error when only one of them is given.
    fn chain(&self) -> Result<Option<ChainAndMint>, Exit> {
        match (&self.rpc_url, self.mint) {
            (None, None) => Ok(None),
            (Some(url), Some(mint)) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(bad_input(anyhow!("--rpc-url {url:?} is not an http:// or https:// URL")));
                }
                Ok(Some((Arc::new(settlement::rpc::RpcChain::new(url)), mint)))
            }
            (Some(_), None) => Err(bad_input(anyhow!("--rpc-url needs --mint: the SPL mint payments are in"))),
            (None, Some(_)) => Err(bad_input(anyhow!("--mint needs --rpc-url: the chain the mint is on"))),
        }
    }
}

/// How a provider is paid.
#[derive(Args, Debug)]
pub(crate) struct HostPayArgs {
    #[command(flatten)]
    chain: ChainArgs,
    /// When to settle: every (inference), every:N, every:30s, or over:AMOUNT.
    #[arg(long, value_name = "POLICY", default_value = "every")]
    settle: Policy,
    /// Inferences served past the last valid voucher before a session stops.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    max_unvouched: u64,
    /// The provider's ledger (read by `wasmgrid earnings`).
    #[arg(long, value_name = "DIR")]
    ledger: Option<PathBuf>,
}

impl HostPayArgs {
    pub(crate) fn payment(&self) -> Result<Option<provider::payment::PaymentConfig>, Exit> {
        let Some((chain, mint)) = self.chain.chain()? else {
            log::warn!("no --rpc-url: inference sessions are served unpaid");
            return Ok(None);
        };
        Ok(Some(provider::payment::PaymentConfig {
            chain,
            mint,
            policy: self.settle,
            max_unvouched: self.max_unvouched,
            ledger: Some(self.ledger.clone().unwrap_or_else(|| data_dir().join("earnings"))),
        }))
    }
}

/// How a renter pays.
#[derive(Args, Debug)]
pub(crate) struct SessionPayArgs {
    #[command(flatten)]
    chain: ChainArgs,
    /// Tokens deposited in escrow with each provider: the most the session may cost there.
    #[arg(long, value_name = "AMOUNT")]
    budget: Option<u64>,
    /// The renter's ledger (read by `wasmgrid spend`).
    #[arg(long, value_name = "DIR")]
    ledger: Option<PathBuf>,
}

impl SessionPayArgs {
    pub(crate) fn payment(&self) -> Result<Option<client::Payment>, Exit> {
        let Some((chain, mint)) = self.chain.chain()? else {
            if self.budget.is_some() {
                return Err(bad_input(anyhow!("--budget needs --rpc-url and --mint")));
            }
            return Ok(None);
        };
        let budget = self
            .budget
            .filter(|b| *b > 0)
            .ok_or_else(|| bad_input(anyhow!("a paid session needs --budget: the most it may cost, in token units")))?;
        Ok(Some(client::Payment {
            chain,
            mint,
            budget,
            ledger: Some(self.ledger.clone().unwrap_or_else(|| data_dir().join("spend"))),
        }))
    }
}

/// What a closed session cost, for `session`'s summary.
pub(crate) fn spend_summary(books: &[Book]) -> Value {
    json!({
        "paid": books.iter().map(|b| b.paid).sum::<u64>(),
        "refunded": books.iter().map(|b| b.refunded).sum::<u64>(),
        "settlements": books.iter().flat_map(|b| b.settlements.clone()).collect::<Vec<_>>(),
        "refunds": books.iter().filter_map(|b| b.refund.clone()).collect::<Vec<_>>(),
    })
}

// ---- wasmgrid chain ----

#[derive(Args, Debug)]
pub(crate) struct ChainCmdArgs {
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

/// `wasmgrid chain`: an in-process chain (LiteSVM) with a payment mint, behind JSON-RPC, so
/// separate processes can settle on one local chain.
pub(crate) fn chain(args: &ChainCmdArgs) -> Result<u8, Exit> {
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

fn session_json(b: &Book) -> Value {
    json!({
        "session": b.session,
        "renter": b.renter.to_string(),
        "provider": b.provider.to_string(),
        "device": b.device,
        "mint": b.mint.to_string(),
        "inferences": b.inferences,
        "price_per_inference": b.price_per_inference,
        "budget": b.budget,
        "amount_due": b.amount_due,
        "vouched": b.vouched,
        "settled": b.paid,
        "pending": b.pending(),
        "refunded": b.refunded,
        "closed": b.closed,
        "settlements": b.settlements,
        "refund": b.refund,
    })
}

/// `wasmgrid earnings`: a provider's takings per device and per session, from its receipts.
pub(crate) fn earnings(args: &LedgerArgs) -> Result<u8, Exit> {
    let dir = args.ledger.clone().unwrap_or_else(|| data_dir().join("earnings"));
    let books = read_books(&dir, Role::Provider)?;
    let mut devices: std::collections::BTreeMap<&str, (u64, u64, u64, u64)> = Default::default();
    for b in &books {
        let d = devices.entry(b.device.as_str()).or_default();
        *d = (d.0 + 1, d.1 + b.inferences, d.2 + b.paid, d.3 + b.pending());
    }
    if args.json {
        let devices: Vec<Value> = devices
            .iter()
            .map(|(name, (n, inf, settled, pending))| {
                json!({ "device": name, "sessions": n, "inferences": inf, "settled": settled, "pending": pending })
            })
            .collect();
        let total_settled: u64 = books.iter().map(|b| b.paid).sum();
        let total_pending: u64 = books.iter().map(Book::pending).sum();
        println!(
            "{}",
            json!({ "ledger": dir.display().to_string(), "settled": total_settled, "pending": total_pending,
                    "devices": devices, "sessions": books.iter().map(session_json).collect::<Vec<_>>() })
        );
        return Ok(exit::OK);
    }
    println!("earnings in {} (token units; pending = due by receipts, not yet settled)", dir.display());
    println!("{:<36} {:>8} {:>11} {:>12} {:>10}", "device", "sessions", "inferences", "settled", "pending");
    for (name, (n, inf, settled, pending)) in &devices {
        println!("{name:<36} {n:>8} {inf:>11} {settled:>12} {pending:>10}");
    }
    println!();
    println!(
        "{:<32} {:<12} {:>10} {:>7} {:>10} {:>10} {:>8}  last settlement",
        "session", "renter", "inferences", "price", "settled", "pending", "settles"
    );
    for b in &books {
        println!(
            "{:<32} {:<12} {:>10} {:>7} {:>10} {:>10} {:>8}  {}",
            b.session,
            short(&b.renter),
            b.inferences,
            b.price_per_inference,
            b.paid,
            b.pending(),
            b.settlements.len(),
            b.settlements.last().map_or("-", String::as_str)
        );
    }
    Ok(exit::OK)
}

/// `wasmgrid spend`: what a renter paid, per session and provider, from the receipts it checked.
pub(crate) fn spend(args: &LedgerArgs) -> Result<u8, Exit> {
    let dir = args.ledger.clone().unwrap_or_else(|| data_dir().join("spend"));
    let books = read_books(&dir, Role::Renter)?;
    let paid: u64 = books.iter().map(|b| b.paid).sum();
    let pending: u64 = books.iter().map(Book::pending).sum();
    let in_escrow: u64 = books.iter().filter(|b| !b.closed).map(|b| b.budget.saturating_sub(b.paid)).sum();
    if args.json {
        println!(
            "{}",
            json!({ "ledger": dir.display().to_string(), "paid": paid, "pending": pending, "in_escrow": in_escrow,
                    "sessions": books.iter().map(session_json).collect::<Vec<_>>() })
        );
        return Ok(exit::OK);
    }
    println!(
        "spend in {}: {paid} paid, {pending} due and not yet settled, {in_escrow} still in open escrows (token units)",
        dir.display()
    );
    println!(
        "{:<32} {:<12} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8}  refund",
        "session", "provider", "inferences", "price", "paid", "pending", "refunded", "settles"
    );
    for b in &books {
        println!(
            "{:<32} {:<12} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8}  {}",
            b.session,
            short(&b.provider),
            b.inferences,
            b.price_per_inference,
            b.paid,
            b.pending(),
            b.refunded,
            b.settlements.len(),
            b.refund.as_deref().unwrap_or(if b.closed { "-" } else { "(escrow open)" })
        );
    }
    Ok(exit::OK)
}

fn short(k: &PublicKey) -> String {
    let s = k.to_string();
    format!("{}..", s.get(..10).unwrap_or(&s))
}
