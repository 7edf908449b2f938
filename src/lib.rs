//! echo-chamber: a byte-exact RFC 862 echo server and client.
