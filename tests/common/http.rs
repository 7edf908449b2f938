//! A minimal HTTP/1.1 client for the metrics endpoint: one request per
//! connection, as the endpoint serves them, with hard timeouts. Also finds
//! the endpoint's address in a server's log and reads metrics off a page.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::ServerProcess;

/// How long any one step of a request may take.
const STEP: Duration = Duration::from_secs(10);

/// An answer from the endpoint.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// The address in the server's `metrics on ADDR` line, waiting up to 10 s
/// for it.
pub fn metrics_addr(server: &ServerProcess) -> SocketAddr {
    server.wait_for_log("metrics on ", STEP);
    let log = server.log();
    let at = log.find("metrics on ").expect("the line just seen");
    let rest = &log[at + "metrics on ".len()..];
    let addr = rest.split_whitespace().next().unwrap_or_default();
    addr.parse()
        .unwrap_or_else(|_| panic!("bad metrics address {addr:?} in the log:\n{log}"))
}

/// Sends `raw` as it is and reads until the endpoint closes.
///
/// # Errors
/// The step that failed.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, STEP).map_err(|err| format!("connect: {err}"))?;
    stream
        .set_read_timeout(Some(STEP))
        .and_then(|()| stream.set_write_timeout(Some(STEP)))
        .map_err(|err| format!("set timeouts: {err}"))?;
    stream
        .write_all(raw)
        .map_err(|err| format!("write the request: {err}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|err| format!("read the answer: {err}"))?;
    Ok(answer)
}

/// Parses an answer's status line, head and body.
///
/// # Errors
/// What is wrong with it.
pub fn parse(answer: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {text:?}"))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no HTTP/1.1 status line in {head:?}"))?;
    Ok(Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// `GET path`, failing the test if no well-formed answer comes.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    try_get(addr, path).unwrap_or_else(|err| panic!("GET {path} from {addr}: {err}"))
}

/// `GET path`.
///
/// # Errors
/// The step that failed.
pub fn try_get(addr: SocketAddr, path: &str) -> Result<Response, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test\r\n\r\n");
    parse(&exchange(addr, request.as_bytes())?)
}

/// The value of the sample `series` (a name, with its labels if it has any,
/// as the page writes them) on a metrics page.
pub fn sample(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series:?} on the page:\n{page}"))
}
