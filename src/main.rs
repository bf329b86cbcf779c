//! iotcored: parse the command line, load the TLS material, run the event
//! loop, and map the outcome to an exit status (documented in `--help` and
//! the README):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | stopped by SIGTERM or SIGINT |
//! | 1 | start-up or runtime error (bad files, no socket, ...) |
//! | 2 | usage error |
//! | 3 | authentication failure [iotcored-3] |
//! | 4 | the broker's certificate failed verification |

use std::io::Write as _;
use std::process::ExitCode;

use iotcored::config::{self, Command};
use iotcored::event_loop::{EventLoop, Exit};
use iotcored::tls;

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_AUTH: u8 = 3;
const EXIT_UNTRUSTED: u8 = 4;

fn main() -> ExitCode {
    let config = match config::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(config)) => *config,
        Ok(Command::Help) => {
            print!("{}", config::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("iotcored {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("iotcored: {e}\nTry 'iotcored --help' for more information.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging();

    if config.keepalive_outside_aws_range() {
        log::warn!(
            "keepalive {} s is outside AWS IoT Core's 30-1200 s; AWS would use the nearest bound",
            config.keepalive
        );
    }
    let tls_config =
        match tls::client_config(&config.rootca, &config.cert, &config.key, config.port) {
            Ok(c) => c,
            Err(e) => return fail(EXIT_ERROR, &e.to_string()),
        };
    let mut event_loop = match EventLoop::new(config, tls_config) {
        Ok(l) => l,
        Err(e) => return fail(EXIT_ERROR, &format!("cannot start: {e}")),
    };
    match event_loop.run() {
        Exit::Stopped => ExitCode::SUCCESS,
        Exit::AuthFailure(msg) => fail(EXIT_AUTH, &format!("authentication failed: {msg}")),
        Exit::ServerUntrusted(msg) => fail(EXIT_UNTRUSTED, &msg),
        Exit::Fatal(msg) => fail(EXIT_ERROR, &msg),
        Exit::Usage(msg) => fail(EXIT_USAGE, &msg),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("iotcored: {msg}");
    ExitCode::from(code)
}

/// Logs to stderr as `LEVEL message`; under systemd (JOURNAL_STREAM set)
/// each line starts with its syslog priority (`<3>`) so the journal keeps
/// the level.
fn init_logging() {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            if journal {
                let prio = match record.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                writeln!(buf, "<{prio}>{}", record.args())
            } else {
                writeln!(buf, "{:<5} {}", record.level(), record.args())
            }
        })
        .init();
}
