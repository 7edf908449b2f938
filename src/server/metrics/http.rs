//! The metrics endpoint's HTTP, beside the echo flow: what a request head
//! asks for and the bytes of each answer. No sockets here: the endpoint's
//! loop ([`super`]) reads a head, asks `parse` what it is, and writes what
//! `answer` gives.
//!
//! The heads are parsed by `httparse`, the parser under hyper; the rules on
//! top are few and strict: only `GET`, three paths, a head of at most
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields, and `Connection: close` on
//! every answer, so that a connection carries one request and nothing is
//! ever kept between requests.

/// The longest request head read; a longer one is answered 431.
pub const MAX_HEAD: usize = 8 * 1024;

/// The most header fields a request may have; more are answered 431.
pub const MAX_HEADERS: usize = 32;

/// What the endpoint serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Page {
    /// `/metrics`: the Prometheus text exposition.
    Metrics,
    /// `/healthz`: 200 while the process serves.
    Health,
    /// `/readyz`: 200 while accepting, 503 from the first signal on.
    Ready,
}

/// The statuses the endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeaderFieldsTooLarge,
    InternalServerError,
    ServiceUnavailable,
}

impl Status {
    fn code_and_reason(self) -> (u16, &'static str) {
        match self {
            Status::Ok => (200, "OK"),
            Status::BadRequest => (400, "Bad Request"),
            Status::NotFound => (404, "Not Found"),
            Status::MethodNotAllowed => (405, "Method Not Allowed"),
            Status::RequestTimeout => (408, "Request Timeout"),
            Status::HeaderFieldsTooLarge => (431, "Request Header Fields Too Large"),
            Status::InternalServerError => (500, "Internal Server Error"),
            Status::ServiceUnavailable => (503, "Service Unavailable"),
        }
    }
}

/// What a request head, as read so far, asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// The head has not ended yet: read more.
    Incomplete,
    /// A `GET` of one of the pages.
    Get(Page),
    /// Answer with this error, then close.
    Reject(Status),
}

/// Reads `head`, all the bytes received on a connection so far (at most
/// [`MAX_HEAD`]: the caller reads no more).
pub(crate) fn parse(head: &[u8]) -> Request {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => route(request.method, request.path),
        // Full, and still no end of the head in sight.
        Ok(httparse::Status::Partial) if head.len() >= MAX_HEAD => {
            Request::Reject(Status::HeaderFieldsTooLarge)
        }
        Ok(httparse::Status::Partial) => Request::Incomplete,
        Err(httparse::Error::TooManyHeaders) => Request::Reject(Status::HeaderFieldsTooLarge),
        // Not HTTP/1.x, or a malformed line: nothing to guess at.
        Err(_) => Request::Reject(Status::BadRequest),
    }
}

fn route(method: Option<&str>, target: Option<&str>) -> Request {
    // A query string changes nothing here (`/metrics?name[]=...` included).
    let path = target
        .and_then(|target| target.split('?').next())
        .unwrap_or_default();
    let page = match path {
        "/metrics" => Page::Metrics,
        "/healthz" => Page::Health,
        "/readyz" => Page::Ready,
        _ => return Request::Reject(Status::NotFound),
    };
    match method {
        Some("GET") => Request::Get(page),
        _ => Request::Reject(Status::MethodNotAllowed),
    }
}

/// The whole answer, head and body, closing the connection after it.
pub(crate) fn answer(status: Status, content_type: &str, body: &str) -> Vec<u8> {
    let (code, reason) = status.code_and_reason();
    let allow = match status {
        Status::MethodNotAllowed => "Allow: GET\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\n\
         Content-Type: {content_type}\r\n\
         Content-Length: {}\r\n\
         Cache-Control: no-store\r\n\
         {allow}Connection: close\r\n\
         \r\n\
         {body}",
        body.len()
    )
    .into_bytes()
}

/// The answer to an error: its reason as a line of plain text.
pub(crate) fn error_answer(status: Status) -> Vec<u8> {
    let (_, reason) = status.code_and_reason();
    answer(status, PLAIN_TEXT, &format!("{}\n", reason.to_lowercase()))
}

/// The content type of the health pages and the errors.
pub(crate) const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn status_line(answer: &[u8]) -> String {
        let text = String::from_utf8_lossy(answer);
        text.lines().next().unwrap_or_default().to_string()
    }

    #[test]
    fn a_get_of_each_page_is_recognised_with_or_without_a_query() {
        let get = |target: &str| parse(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes());
        assert_eq!(get("/metrics"), Request::Get(Page::Metrics));
        assert_eq!(
            get("/metrics?name[]=echo_connections"),
            Request::Get(Page::Metrics)
        );
        assert_eq!(get("/healthz"), Request::Get(Page::Health));
        assert_eq!(get("/readyz"), Request::Get(Page::Ready));
        let http10 = parse(b"GET /readyz HTTP/1.0\r\nHost: x\r\nAccept: */*\r\n\r\n");
        assert_eq!(http10, Request::Get(Page::Ready));
    }

    #[test]
    fn a_head_cut_short_asks_for_more_until_it_ends() {
        let whole = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for end in 0..whole.len() {
            assert_eq!(
                parse(&whole[..end]),
                Request::Incomplete,
                "after {end} bytes"
            );
        }
        assert_eq!(parse(whole), Request::Get(Page::Metrics));
    }

    #[test]
    fn other_paths_are_404_and_other_methods_405() {
        let parsed = |head: &[u8]| parse(head);
        assert_eq!(
            parsed(b"GET / HTTP/1.1\r\n\r\n"),
            Request::Reject(Status::NotFound)
        );
        assert_eq!(
            parsed(b"GET /metrics/ HTTP/1.1\r\n\r\n"),
            Request::Reject(Status::NotFound)
        );
        assert_eq!(
            parsed(b"GET http://host/metrics HTTP/1.1\r\n\r\n"),
            Request::Reject(Status::NotFound)
        );
        for method in ["POST", "HEAD", "PUT", "DELETE", "OPTIONS", "get"] {
            let head = format!("{method} /metrics HTTP/1.1\r\n\r\n");
            assert_eq!(
                parse(head.as_bytes()),
                Request::Reject(Status::MethodNotAllowed),
                "{method}"
            );
        }
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"\0\0\0\0",
            b"GET /me trics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                parse(garbage),
                Request::Reject(Status::BadRequest),
                "{:?}",
                String::from_utf8_lossy(garbage)
            );
        }
    }

    #[test]
    fn a_head_that_fills_the_buffer_or_has_too_many_fields_is_431() {
        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        huge.resize(MAX_HEAD, b'a');
        assert_eq!(parse(&huge), Request::Reject(Status::HeaderFieldsTooLarge));
        huge.truncate(MAX_HEAD - 1);
        assert_eq!(parse(&huge), Request::Incomplete, "one byte short of full");

        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for n in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{n}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(many.len() < MAX_HEAD);
        assert_eq!(parse(&many), Request::Reject(Status::HeaderFieldsTooLarge));
    }

    #[test]
    fn every_answer_says_its_length_and_closes() {
        let ok = answer(Status::Ok, PLAIN_TEXT, "ok\n");
        assert_eq!(
            String::from_utf8_lossy(&ok),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\n\r\nok\n"
        );
        let refused = error_answer(Status::MethodNotAllowed);
        let text = String::from_utf8_lossy(&refused);
        assert_eq!(status_line(&refused), "HTTP/1.1 405 Method Not Allowed");
        assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nmethod not allowed\n"), "{text}");
        for status in [
            Status::BadRequest,
            Status::NotFound,
            Status::RequestTimeout,
            Status::HeaderFieldsTooLarge,
            Status::InternalServerError,
            Status::ServiceUnavailable,
        ] {
            let answer = error_answer(status);
            let text = String::from_utf8_lossy(&answer);
            let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
            assert!(head.contains("Connection: close"), "{head}");
            assert!(
                head.contains(&format!("Content-Length: {}", body.len())),
                "{head}"
            );
        }
    }
}
