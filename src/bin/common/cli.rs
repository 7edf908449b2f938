//! Command-line plumbing shared by both binaries: argh parsing with this
//! project's rules. `--help` prints to stdout and succeeds; a usage mistake
//! becomes one line for stderr, which the binary turns into exit code 2
//! (argh alone would exit 1).

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Write};

use argh::FromArgs;
use echo_chamber::error::io_cause;

/// What the command line asked for.
pub enum Parsed<T> {
    /// Run with these arguments.
    Run(T),
    /// `--help` was printed; exit 0.
    Answered,
    /// `--help` could not be written, as one line without the program name.
    CannotAnswer(String),
    /// A usage error, as one line without the program name.
    Usage(String),
}

/// Parses the process's arguments as `T` for the program `prog`.
pub fn parse<T: FromArgs>(prog: &str) -> Parsed<T> {
    parse_from(prog, std::env::args_os().skip(1).collect())
}

fn parse_from<T: FromArgs>(prog: &str, raw: Vec<OsString>) -> Parsed<T> {
    let mut strings = Vec::with_capacity(raw.len());
    for arg in raw {
        match arg.into_string() {
            Ok(arg) => strings.push(arg),
            Err(arg) => {
                // Name the option whose value this is, if it follows one.
                let of = match strings.last() {
                    Some(flag) if flag.starts_with('-') => format!(" of {flag}"),
                    _ => String::new(),
                };
                return Parsed::Usage(format!(
                    "argument {:?}{of} is not valid UTF-8 (see --help)",
                    arg.to_string_lossy()
                ));
            }
        }
    }
    let strs: Vec<&str> = strings.iter().map(String::as_str).collect();
    match T::from_args(&[prog], &strs) {
        Ok(args) => Parsed::Run(args),
        Err(early) => match early.status {
            Ok(()) => {
                let newline = if early.output.ends_with('\n') {
                    ""
                } else {
                    "\n"
                };
                match print_out(&format!("{}{newline}", early.output)) {
                    Ok(()) => Parsed::Answered,
                    Err(message) => Parsed::CannotAnswer(message),
                }
            }
            Err(()) => Parsed::Usage(format!("{} (see --help)", one_line(&early.output))),
        },
    }
}

/// Writes `text` to stdout without the panic `println!` would give.
///
/// # Errors
/// A failed write other than a reader that went away (`--version | head -0`),
/// which, as for ripgrep, is a normal end.
pub fn print_out(text: &str) -> Result<(), String> {
    write_out(text).map(drop)
}

/// Like [`print_out`], and says whether stdout still has a reader: `false`
/// once it has gone, so that the caller can stop producing output.
///
/// # Errors
/// A failed write other than a reader that went away, as one message.
pub fn write_out(text: &str) -> Result<bool, String> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        // The reader went away (`| head`): a normal end.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(format!("cannot write to stdout: {}", io_cause(&err))),
    }
}

/// `value` as a whole number, if it is one: ASCII digits only, so that
/// `+80` is refused (std's `from_str` takes a leading `+`), and in range.
pub fn whole_number<T: std::str::FromStr>(value: &str) -> Option<T> {
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| value.parse().ok()).flatten()
}

/// Writes `prog: message` as one line to stderr, without the panic
/// `eprintln!` would give.
pub fn print_err(prog: &str, message: impl Display) {
    // One write, so that lines from other processes on the same stderr do
    // not land inside it.
    write_err(&format!("{prog}: {message}\n"));
}

/// Writes `text` to stderr in one write, without the panic `eprint!` would
/// give.
pub fn write_err(text: &str) {
    // Stderr is where failures are reported; if it fails there is no one left to tell.
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

/// A switch's occurrences as a yes or no; given twice is a usage error, as
/// for options.
pub fn once(count: u8, flag: &str) -> Result<bool, String> {
    match count {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(format!("{flag} given more than once")),
    }
}

/// argh's message on one line, starting lowercase like ours.
fn one_line(output: &str) -> String {
    let joined = output.split_whitespace().collect::<Vec<_>>().join(" ");
    // argh ends some messages with a period; ours go on with `(see --help)`.
    let joined = joined.trim_end_matches('.');
    let mut chars = joined.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "invalid arguments".to_owned(),
    }
}
