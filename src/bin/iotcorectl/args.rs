//! The command line: the `--help` text, and the parser that turns the
//! arguments into a validated [`Invocation`], or a [`UsageError`] (exit
//! status 2) naming the option and what is wrong. Common options go before
//! or after the command; each command refuses the options it does not take.
//! Nothing here touches the daemon or reads the payload.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;
use std::time::Duration;

use iotcored::config::bus_socket_path;
// A usage error: the message names the option and what is wrong. The
// daemon's own, for the same message shape and `From<lexopt::Error>`.
use iotcored::config::UsageError;

pub(crate) const HELP: &str = "\
Usage: iotcorectl [OPTIONS] COMMAND [COMMAND OPTIONS]

Local client of iotcored: talks to the daemon over its core bus socket
<socket-dir>/<interface_name>.

Commands:
  pub -t TOPIC [-m MESSAGE | -f FILE | -s | -l] [-q 0|1] [-r]
        publish one message (none of -m/-f/-s/-l: an empty payload)
  sub -t FILTER [-t FILTER ...] [-q 0|1] [-C COUNT] [-W SECONDS] [-v]
        subscribe and print each message's payload, raw, then a newline
  status [-w [-W SECONDS]]
        print connected or disconnected (with -w: every change)
  stats
        print the daemon's counters as \"key value\" lines

Options of pub:
  -t, --topic TOPIC           topic to publish to
  -m, --message MESSAGE       payload given here
  -f, --file FILE             payload read from FILE
  -s, --stdin-file            payload read from stdin, whole
  -l, --stdin-line            one message per line of stdin (blank lines are
                              skipped); calls are pipelined on one connection
  -q, --qos 0|1               quality of service [default: 0]
  -r, --retain                set the retain flag
Options of sub:
  -t, --topic FILTER          topic filter; repeat for several
  -q, --qos 0|1               quality of service [default: 0]
  -C, --count COUNT           exit after COUNT messages
  -W, --wait SECONDS          give up after SECONDS (exit status 3)
  -v, --verbose               print \"topic payload\" instead of the payload
Options of status:
  -w, --watch                 print every change until interrupted
  -W, --wait SECONDS          with -w: stop after SECONDS; the exit status
                              is then that of the last state

Common options (before or after COMMAND):
  -n, --interface_name NAME   core bus interface name [default: aws_iot_mqtt]
      --socket-dir DIR        socket directory [default: /run/greengrass]
      --timeout SECONDS       how long to wait for each answer [default: 10]
  -h, --help                  print this help
  -V, --version               print the version

Exit status:
  0      success
  1      local error: cannot connect, cannot read the input, bad frame from
         the daemon, connection closed by the daemon
  2      usage error
  3      timeout: no answer within --timeout, or -W passed
  4      status: iotcored is not connected to AWS IoT Core
  10+N   the daemon answered error code N:
           11 FAILURE   12 RETRY     13 BUSY      14 FATAL     15 INVALID
           16 UNSUPPORTED            17 PARSE     18 RANGE     19 NOMEM
           20 NOCONN    21 NODATA    22 NOENTRY   23 CONFIG    24 REMOTE
           25 EXPECTED  26 TIMEOUT   27 UNAUTHORIZED           28 CONFLICT
         an unknown code counts as FAILURE (11). With pub -l, the status of
         the first refused line.
";

/// What the command line asked for.
#[derive(Debug, PartialEq)]
pub(crate) enum Command {
    Run(Invocation),
    Help,
    Version,
}

/// A validated command line.
#[derive(Debug, PartialEq)]
pub(crate) struct Invocation {
    pub(crate) socket: PathBuf,
    /// How long to wait for each answer (and for each write).
    pub(crate) timeout: Duration,
    pub(crate) action: Action,
}

/// Where `pub` takes its payload from.
#[derive(Debug, PartialEq)]
pub(crate) enum Source {
    Empty,
    Message(Vec<u8>),
    File(PathBuf),
    Stdin,
    Lines,
}

/// The command and its own options.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    Pub {
        topic: Vec<u8>,
        source: Source,
        qos: i64,
        retain: bool,
    },
    Sub {
        filters: Vec<Vec<u8>>,
        qos: i64,
        count: Option<u64>,
        wait: Option<Duration>,
        verbose: bool,
    },
    Status {
        watch: bool,
        wait: Option<Duration>,
    },
    Stats,
}

fn usage<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// Every option as given, before the command decides which apply.
#[derive(Default)]
struct Raw {
    command: Option<String>,
    interface_name: Option<String>,
    socket_dir: Option<PathBuf>,
    timeout: Option<Duration>,
    topics: Vec<Vec<u8>>,
    source: Option<Source>,
    qos: Option<i64>,
    retain: bool,
    count: Option<u64>,
    wait: Option<Duration>,
    verbose: bool,
    watch: bool,
}

/// Parses the command line (without the program name).
pub(crate) fn parse<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut raw = Raw::default();
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('n') | Long("interface_name") | Long("interface-name") => {
                raw.interface_name = Some(utf8(parser.value()?, "--interface_name")?);
            }
            Long("socket-dir") => raw.socket_dir = Some(PathBuf::from(parser.value()?)),
            Long("timeout") => raw.timeout = Some(seconds(parser.value()?, "--timeout")?),
            Short('t') | Long("topic") => raw.topics.push(parser.value()?.into_vec()),
            Short('m') | Long("message") => {
                set_source(&mut raw, Source::Message(parser.value()?.into_vec()))?;
            }
            Short('f') | Long("file") => {
                set_source(&mut raw, Source::File(PathBuf::from(parser.value()?)))?;
            }
            Short('s') | Long("stdin-file") => set_source(&mut raw, Source::Stdin)?,
            Short('l') | Long("stdin-line") => set_source(&mut raw, Source::Lines)?,
            Short('q') | Long("qos") => {
                raw.qos = Some(match utf8(parser.value()?, "-q")?.as_str() {
                    "0" => 0,
                    "1" => 1,
                    other => {
                        return usage(format!(
                            "-q: QoS {other:?} is not 0 or 1 (AWS IoT Core has no QoS 2)"
                        ))
                    }
                });
            }
            Short('r') | Long("retain") => raw.retain = true,
            Short('C') | Long("count") => {
                let text = utf8(parser.value()?, "-C")?;
                match text.parse::<u64>() {
                    Ok(n) if n > 0 => raw.count = Some(n),
                    _ => return usage(format!("-C: {text:?} is not a whole number above 0")),
                }
            }
            Short('W') | Long("wait") => raw.wait = Some(seconds(parser.value()?, "-W")?),
            Short('v') | Long("verbose") => raw.verbose = true,
            Short('w') | Long("watch") => raw.watch = true,
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Value(v) if raw.command.is_none() => raw.command = Some(utf8(v, "COMMAND")?),
            Value(v) => {
                return usage(format!(
                    "unexpected argument {:?} (a value with spaces needs quotes)",
                    v.to_string_lossy()
                ))
            }
            _ => return Err(arg.unexpected().into()),
        }
    }
    validate(raw).map(Command::Run)
}

fn utf8(value: OsString, name: &str) -> Result<String, UsageError> {
    value
        .into_string()
        .or_else(|_| usage(format!("{name}: the value is not valid UTF-8")))
}

/// A positive number of seconds, fractions allowed.
fn seconds(value: OsString, name: &str) -> Result<Duration, UsageError> {
    let text = utf8(value, name)?;
    match text.parse::<f64>().map(Duration::try_from_secs_f64) {
        Ok(Ok(d)) if !d.is_zero() => Ok(d),
        _ => usage(format!(
            "{name}: {text:?} is not a number of seconds above 0"
        )),
    }
}

fn set_source(raw: &mut Raw, source: Source) -> Result<(), UsageError> {
    if raw.source.is_some() {
        return usage("give the payload once: one of -m, -f, -s, -l");
    }
    raw.source = Some(source);
    Ok(())
}

fn validate(raw: Raw) -> Result<Invocation, UsageError> {
    let name = raw
        .interface_name
        .unwrap_or_else(|| String::from("aws_iot_mqtt"));
    let dir = raw
        .socket_dir
        .unwrap_or_else(|| PathBuf::from("/run/greengrass"));
    let socket = match bus_socket_path(&dir, &name) {
        Ok(path) => path,
        Err(e) => return usage(e),
    };
    let Some(command) = raw.command else {
        return usage("missing COMMAND: pub, sub, status or stats");
    };
    // The options each command does not take.
    let foreign: &[(bool, &str)] = match command.as_str() {
        "pub" => &[
            (raw.count.is_some(), "-C"),
            (raw.wait.is_some(), "-W"),
            (raw.verbose, "-v"),
            (raw.watch, "-w"),
        ],
        "sub" => &[
            (raw.source.is_some(), "-m/-f/-s/-l"),
            (raw.retain, "-r"),
            (raw.watch, "-w"),
        ],
        "status" | "stats" => &[
            (!raw.topics.is_empty(), "-t"),
            (raw.source.is_some(), "-m/-f/-s/-l"),
            (raw.qos.is_some(), "-q"),
            (raw.retain, "-r"),
            (raw.count.is_some(), "-C"),
            (raw.verbose, "-v"),
            (command == "stats" && raw.watch, "-w"),
            (command == "stats" && raw.wait.is_some(), "-W"),
        ],
        other => {
            return usage(format!(
                "unknown command {other:?}: pub, sub, status or stats"
            ))
        }
    };
    if let Some((_, flag)) = foreign.iter().find(|(given, _)| *given) {
        return usage(format!("{flag} does not apply to {command}"));
    }
    let qos = raw.qos.unwrap_or(0);
    let action = match command.as_str() {
        "pub" => {
            let mut topics = raw.topics.into_iter();
            let (Some(topic), None) = (topics.next(), topics.next()) else {
                return usage("pub takes exactly one -t TOPIC");
            };
            Action::Pub {
                topic,
                source: raw.source.unwrap_or(Source::Empty),
                qos,
                retain: raw.retain,
            }
        }
        "sub" => {
            if raw.topics.is_empty() {
                return usage("sub needs at least one -t FILTER");
            }
            Action::Sub {
                filters: raw.topics,
                qos,
                count: raw.count,
                wait: raw.wait,
                verbose: raw.verbose,
            }
        }
        "status" => {
            if raw.wait.is_some() && !raw.watch {
                return usage("-W applies to status only with -w");
            }
            Action::Status {
                watch: raw.watch,
                wait: raw.wait,
            }
        }
        _ => Action::Stats,
    };
    Ok(Invocation {
        socket,
        timeout: raw.timeout.unwrap_or(Duration::from_secs(10)),
        action,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use iotcored::bus::frame::ErrorCode;
    use std::path::Path;

    /// Parses a command line given as one string, split at spaces.
    fn parse_line(line: &str) -> Result<Command, UsageError> {
        parse(line.split_whitespace())
    }

    /// A command line that must parse into an invocation (also used by the
    /// client's tests).
    pub(crate) fn parse_ok(line: &str) -> Invocation {
        match parse_line(line) {
            Ok(Command::Run(inv)) => inv,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn parse_err(line: &str) -> String {
        match parse_line(line) {
            Err(UsageError(msg)) => msg,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn pub_with_a_message_parses_with_defaults() {
        let inv = parse_ok("pub -t a/b -m hi");
        assert_eq!(inv.socket, Path::new("/run/greengrass/aws_iot_mqtt"));
        assert_eq!(inv.timeout, Duration::from_secs(10));
        let expected = Action::Pub {
            topic: b"a/b".to_vec(),
            source: Source::Message(b"hi".to_vec()),
            qos: 0,
            retain: false,
        };
        assert_eq!(inv.action, expected);
    }

    #[test]
    fn common_options_go_before_or_after_the_command() {
        let a = parse_ok("-n other --socket-dir /tmp/s --timeout 0.5 pub -t x -q1 -r -s");
        let b = parse_ok(
            "pub -t x --qos 1 --retain --stdin-file --timeout=0.5 \
             --interface_name other --socket-dir=/tmp/s",
        );
        assert_eq!(a, b);
        assert_eq!(a.socket, Path::new("/tmp/s/other"));
        assert_eq!(a.timeout, Duration::from_millis(500));
        let expected = Action::Pub {
            topic: b"x".to_vec(),
            source: Source::Stdin,
            qos: 1,
            retain: true,
        };
        assert_eq!(a.action, expected);
    }

    #[test]
    fn pub_takes_one_payload_source_or_none() {
        let source = |line: &str| match parse_ok(line).action {
            Action::Pub { source, .. } => source,
            other => panic!("{other:?}"),
        };
        assert_eq!(source("pub -t x"), Source::Empty);
        assert_eq!(
            source("pub -t x -f /etc/hosts"),
            Source::File("/etc/hosts".into())
        );
        assert_eq!(source("pub -t x -l"), Source::Lines);
        for line in ["pub -t x -m a -f b", "pub -t x -s -l", "pub -t x -m a -m b"] {
            let msg = parse_err(line);
            assert!(msg.contains("one of -m, -f, -s, -l"), "{line}: {msg}");
        }
    }

    #[test]
    fn sub_collects_every_filter_and_its_own_options() {
        let inv = parse_ok("sub -t a/# -t b/+ -C 3 -W 2 -v -q 1");
        let expected = Action::Sub {
            filters: vec![b"a/#".to_vec(), b"b/+".to_vec()],
            qos: 1,
            count: Some(3),
            wait: Some(Duration::from_secs(2)),
            verbose: true,
        };
        assert_eq!(inv.action, expected);
    }

    #[test]
    fn status_and_stats_parse() {
        let once = Action::Status {
            watch: false,
            wait: None,
        };
        assert_eq!(parse_ok("status").action, once);
        let watch = Action::Status {
            watch: true,
            wait: Some(Duration::from_millis(1500)),
        };
        assert_eq!(parse_ok("status -w -W 1.5").action, watch);
        assert_eq!(parse_ok("stats").action, Action::Stats);
    }

    #[test]
    fn help_and_version_win_over_everything_before_them() {
        assert_eq!(parse_line("pub -h"), Ok(Command::Help));
        assert_eq!(parse_line("--help"), Ok(Command::Help));
        assert_eq!(parse_line("-V"), Ok(Command::Version));
        assert_eq!(parse_line("sub --version"), Ok(Command::Version));
    }

    #[test]
    fn bad_command_lines_are_usage_errors_naming_the_problem() {
        let cases = [
            ("", "missing COMMAND"),
            ("publish", "unknown command \"publish\""),
            ("pub", "exactly one -t"),
            ("pub -t a -t b", "exactly one -t"),
            ("sub", "at least one -t"),
            ("pub -t a -q 2", "not 0 or 1"),
            ("sub -t a -C 0", "-C: \"0\""),
            ("sub -t a -W 0", "-W: \"0\""),
            ("sub -t a -W -1", "-W"),
            ("stats --timeout soon", "--timeout: \"soon\""),
            ("sub -t a -m x", "-m/-f/-s/-l does not apply to sub"),
            ("pub -t a -C 1", "-C does not apply to pub"),
            ("stats -w", "-w does not apply to stats"),
            ("status -W 1", "-W applies to status only with -w"),
            ("stats extra", "unexpected argument \"extra\""),
            ("stats -n a/b", "--interface_name"),
            ("stats --bogus", "--bogus"),
        ];
        for (line, expected) in cases {
            let msg = parse_err(line);
            assert!(msg.contains(expected), "{line}: {msg}");
        }
        let long_dir = format!("stats --socket-dir /{}", "d".repeat(100));
        assert!(parse_err(&long_dir).contains("longer than 107"));
    }

    #[test]
    fn the_help_lists_every_daemon_code_with_its_exit_status() {
        for code in 1..=18 {
            let name = ErrorCode::from_i32(code).unwrap().name();
            let entry = format!("{} {name}", 10 + code);
            assert!(HELP.contains(&entry), "{entry}");
        }
        assert!(HELP.lines().all(|l| l.len() <= 80));
    }
}
