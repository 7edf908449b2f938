//! Command-line plumbing shared by both binaries: argh parsing with this
//! project's rules. `--help` prints to stdout and succeeds; a usage mistake
//! becomes one line for stderr, which the binary turns into exit code 2
//! (argh alone would exit 1).

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Write};

use argh::FromArgs;

/// What the command line asked for.
pub enum Parsed<T> {
    /// Run with these arguments.
    Run(T),
    /// `--help` was printed; exit 0.
    Answered,
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
                return Parsed::Usage(format!(
                    "argument {:?} is not valid UTF-8",
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
                print_out(&format!("{}{newline}", early.output));
                Parsed::Answered
            }
            Err(()) => Parsed::Usage(format!("{} (see --help)", one_line(&early.output))),
        },
    }
}

/// Writes `text` to stdout. A reader that went away (`--version | head -0`)
/// is a normal end, like ripgrep's `BrokenPipe`, and there is nowhere left to
/// report any other failure, so neither may panic as `println!` would.
pub fn print_out(text: &str) {
    let _ = io::stdout().lock().write_all(text.as_bytes());
}

/// Writes `prog: message` as one line to stderr; a failure to write it has
/// nowhere to be reported, and must not panic as `eprintln!` would.
pub fn print_err(prog: &str, message: impl Display) {
    let _ = writeln!(io::stderr().lock(), "{prog}: {message}");
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
    let mut chars = joined.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "invalid arguments".to_owned(),
    }
}
