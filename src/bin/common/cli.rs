//! Command-line plumbing shared by both binaries: argh parsing with this
//! project's rules. `-h` and `-V` mean `--help` and `--version`; `--help`
//! prints to stdout, with the same placeholders (`ADDR`, `N`, `DUR`) and
//! headings in both binaries, and succeeds; a usage mistake becomes one line
//! for stderr, which the binary turns into exit code 2 (argh alone would
//! exit 1). Duration values are parsed, and refused, in the same words by both.

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Write};
use std::time::Duration;

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
    let help = help_text::<T>(prog);
    let strings = expand_short_flags(strings, |option| takes_value(&help, option));
    let strs: Vec<&str> = strings.iter().map(String::as_str).collect();
    match T::from_args(&[prog], &strs) {
        Ok(args) => Parsed::Run(args),
        Err(early) => match early.status {
            Ok(()) => {
                let output = tidy_help(&early.output);
                let newline = if output.ends_with('\n') { "" } else { "\n" };
                match print_out(&format!("{output}{newline}")) {
                    Ok(()) => Parsed::Answered,
                    Err(message) => Parsed::CannotAnswer(message),
                }
            }
            Err(()) => Parsed::Usage(format!("{} (see --help)", one_line(&early.output))),
        },
    }
}

/// argh's `--help` text for `T`, untidied: its usage line tells which
/// options take a value (`[--port <port>]`).
fn help_text<T: FromArgs>(prog: &str) -> String {
    match T::from_args(&[prog], &["--help"]) {
        Err(early) => early.output,
        // argh always answers --help; without its text, no option takes
        // a value, and -h and -V are only ever rewritten as flags.
        Ok(_) => String::new(),
    }
}

/// Whether `option` takes a value, according to the usage line of `help`.
fn takes_value(help: &str, option: &str) -> bool {
    let usage = help.lines().next().unwrap_or_default();
    usage.contains(&format!("[{option} <"))
}

/// `-h` and `-V` as `--help` and `--version`, the usual short forms that
/// argh lacks; only as whole arguments, never as the value of an option
/// (`--message -h` sends `-h`), nor after `--`.
fn expand_short_flags(args: Vec<String>, takes_value: impl Fn(&str) -> bool) -> Vec<String> {
    let mut expanded = Vec::with_capacity(args.len());
    let mut value_due = false;
    let mut options_ended = false;
    for arg in args {
        let is_value = std::mem::take(&mut value_due);
        let arg = match arg.as_str() {
            _ if is_value || options_ended => arg,
            "--" => {
                options_ended = true;
                arg
            }
            "-h" => "--help".to_owned(),
            "-V" => "--version".to_owned(),
            option => {
                value_due = option.starts_with("--") && takes_value(option);
                arg
            }
        };
        expanded.push(arg);
    }
    expanded
}

/// argh's help made to read the same in both binaries: placeholders in
/// capitals as the docs write them (`--port PORT`, `[ADDR]`), the usage
/// wrapped at 80 columns, and the exit codes under "Exit codes".
fn tidy_help(help: &str) -> String {
    let mut lines = help.lines();
    let Some(usage) = lines.next().filter(|line| line.starts_with("Usage: ")) else {
        return help.to_owned();
    };
    let mut usage = usage.to_owned();
    while let Some(start) = usage.find('<') {
        let Some(len) = usage[start..].find('>') else {
            break;
        };
        let name = usage[start + 1..start + len].to_uppercase();
        usage.replace_range(start..=start + len, &name);
    }
    let mut tidy = wrap_usage(&usage);
    for line in lines {
        tidy.push('\n');
        // argh lists only the long forms; the wrapper also takes -V and -h.
        let short = match line.split_once("  ") {
            Some(("", rest)) if rest.starts_with("--version ") => Some(("-V, --version", rest)),
            Some(("", rest)) if rest.starts_with("--help, help ") => {
                Some(("-h, --help, help", rest))
            }
            _ => None,
        };
        match short {
            Some((flags, rest)) => {
                let description = rest.split_once("  ").map_or("", |(_, d)| d.trim_start());
                let width = rest.len() - description.len();
                tidy.push_str(&format!("  {flags:<width$}{description}"));
            }
            None if line == "Error codes:" => tidy.push_str("Exit codes:"),
            None => tidy.push_str(line),
        }
    }
    if help.ends_with('\n') {
        tidy.push('\n');
    }
    tidy
}

/// The usage line broken before a `[` so that no line passes 80 columns,
/// each continuation indented under the first flag.
fn wrap_usage(usage: &str) -> String {
    const WIDTH: usize = 80;
    let indent = usage.find(" [").map_or(0, |at| at + 1).min(WIDTH / 2);
    let mut wrapped = String::new();
    let mut line = String::new();
    for (at, word) in usage.split(" [").enumerate() {
        let word = if at == 0 {
            word.to_owned()
        } else {
            format!("[{word}")
        };
        if !line.is_empty() && line.len() + 1 + word.len() > WIDTH {
            wrapped.push_str(&line);
            wrapped.push('\n');
            line = " ".repeat(indent);
        } else if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    wrapped.push_str(&line);
    wrapped
}

/// A duration such as `2s`, `500ms` or `1m 30s`, for every duration flag of
/// both binaries.
///
/// # Errors
/// One message saying what a duration looks like, with humantime's reason.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|err| format!("expected a duration such as 2s, 500ms or 1m 30s ({err})"))
}

/// A [`parse_duration`] that must be more than zero.
///
/// # Errors
/// As [`parse_duration`], and for a zero duration.
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        Duration::ZERO => Err("must be more than 0".to_owned()),
        duration => Ok(duration),
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
