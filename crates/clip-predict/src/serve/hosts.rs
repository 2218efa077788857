//! Whom the server answers: requests for the host it listens as, from its own page only.

use std::net::{IpAddr, SocketAddr};

use hyper::header::{HeaderMap, HOST, ORIGIN};

use super::{error, Reply};

/// The Host names answered: the listening address (an IP literal; any IP literal when it
/// listens on all addresses), `localhost` on a loopback or unspecified address, and those given
/// with `--allow-host`. Ports are not compared (a forwarded port keeps working): DNS rebinding
/// needs a name, and names are what is checked. An `Origin` must be `http://` + that request's
/// own `Host`, port and all.
pub(super) struct Hosts {
    names: Vec<String>,
    any_ip: bool,
}

impl Hosts {
    pub(super) fn new(local: SocketAddr, extra: &[String]) -> Self {
        let ip = local.ip();
        let mut names = vec![ip.to_string()];
        if ip.is_loopback() || ip.is_unspecified() {
            names.push("localhost".into());
        }
        names.extend(extra.iter().map(|h| host_name(h)));
        Hosts {
            names,
            any_ip: ip.is_unspecified(),
        }
    }

    fn allows(&self, host: &str) -> bool {
        let name = host_name(host);
        self.names.contains(&name) || (self.any_ip && name.parse::<IpAddr>().is_ok())
    }

    /// The refusal of a request from a host or a page not allowed.
    pub(super) fn check(&self, headers: &HeaderMap) -> std::result::Result<(), Reply> {
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        let host = match host {
            Some(h) if self.allows(h) => h.trim(),
            Some(h) => {
                return Err(error(
                    421,
                    format!("this server does not answer for the host {h:?} (see --allow-host)"),
                ))
            }
            None => return Err(error(400, "the request has no Host header")),
        };
        // Same origin only: `http://` and the very host[:port] the request was sent to (so with
        // --addr 0.0.0.0, a page at another IP is refused though that IP would pass as a Host).
        for origin in headers.get_all(ORIGIN) {
            let ok = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !ok {
                return Err(error(
                    403,
                    format!("requests from pages of other sites are refused (Origin {origin:?})"),
                ));
            }
        }
        Ok(())
    }
}

/// A Host (or `--allow-host`) value's name: lower case, without the port, the brackets of an
/// IPv6 literal or a final dot.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_listening_address_and_allowed_names_are_answered() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let hosts = Hosts::new(local, &["photos.lan:9000".into(), "Box.Local".into()]);
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.0.0.1:9999",
            "localhost",
            "LOCALHOST:8080",
            "photos.lan",
            "box.local.",
            "box.local:1",
        ] {
            assert!(hosts.check(&headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        for bad in [
            "evil.attacker.example",
            "evil.attacker.example:8080",
            "127.0.0.2",
            "localhost.evil.example",
            "[::1]",
            "",
        ] {
            assert_eq!(hosts.check(&headers(&[("host", bad)])).unwrap_err().0, 421, "{bad}");
        }
        assert_eq!(hosts.check(&HeaderMap::new()).unwrap_err().0, 400);
        // The page's own origin (http, an allowed host) is answered; any other is refused.
        assert!(hosts
            .check(&headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8080")
            ]))
            .is_ok());
        assert!(hosts
            .check(&headers(&[
                ("host", "localhost:8080"),
                ("origin", "http://localhost:8080")
            ]))
            .is_ok());
        for origin in [
            "http://evil.attacker.example",
            "https://127.0.0.1:8080",
            "null",
            "http://127.0.0.1:8080/x",
            "file://",
        ] {
            let h = headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]);
            assert_eq!(hosts.check(&h).unwrap_err().0, 403, "{origin}");
        }
        // IPv6, and all addresses: any IP literal and localhost, never a name.
        let v6 = Hosts::new("[::1]:80".parse().unwrap(), &[]);
        assert!(v6.allows("[::1]:80") && v6.allows("[::1]") && v6.allows("localhost") && !v6.allows("127.0.0.1"));
        let all = Hosts::new("0.0.0.0:80".parse().unwrap(), &[]);
        assert!(all.allows("192.0.2.7:80") && all.allows("localhost") && !all.allows("evil.attacker.example"));
        let lan = Hosts::new("192.0.2.7:80".parse().unwrap(), &[]);
        assert!(lan.allows("192.0.2.7") && !lan.allows("localhost"));
    }

    #[test]
    fn an_origin_must_be_the_request_s_own_host_even_on_all_addresses() {
        let all = Hosts::new("0.0.0.0:8080".parse().unwrap(), &[]);
        // Any IP literal passes as a Host on 0.0.0.0, but a page at another IP cannot post.
        for (host, origin) in [
            ("192.0.2.7:8080", "http://203.0.113.9"),
            ("192.0.2.7:8080", "http://203.0.113.9:8080"),
            ("192.0.2.7:8080", "http://192.0.2.7:9999"),
            ("192.0.2.7:8080", "http://192.0.2.7"),
            ("192.0.2.7:8080", "https://192.0.2.7:8080"),
            ("localhost:8080", "http://127.0.0.1:8080"),
            ("192.0.2.7:8080", "http://192.0.2.7:8080/"),
        ] {
            let h = headers(&[("host", host), ("origin", origin)]);
            assert_eq!(all.check(&h).unwrap_err().0, 403, "{host} {origin}");
        }
        for (host, origin) in [
            ("192.0.2.7:8080", "http://192.0.2.7:8080"),
            ("localhost:8080", "http://LocalHost:8080"),
            ("[::1]:8080", "http://[::1]:8080"),
            ("192.0.2.7", "http://192.0.2.7"),
        ] {
            let h = headers(&[("host", host), ("origin", origin)]);
            assert!(all.check(&h).is_ok(), "{host} {origin}");
        }
        // Two Origins: each must match.
        let h = headers(&[
            ("host", "192.0.2.7:8080"),
            ("origin", "http://192.0.2.7:8080"),
            ("origin", "http://203.0.113.9"),
        ]);
        assert_eq!(all.check(&h).unwrap_err().0, 403);
    }
}
