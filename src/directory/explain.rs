//! What a failed bind or TLS handshake means for the admin, and which config key fixes it.
//!
//! Directory servers answer with result codes and terse texts ("Strong(er) authentication
//! required", "AcceptSecurityContext error, data 52e"), and TLS libraries with certificate
//! error names. An admin setting up coursegate against a domain controller needs the sentence
//! that says what to change in `[ldap]`; these functions write it. They never see a password.

use std::path::Path;

/// The message for a bind refused with result code 8 (strongerAuthRequired): the server wants
/// an encrypted connection (Active Directory and Samba by default) before a simple bind.
pub fn stronger_auth_required(url: &str, server_text: &str) -> String {
    let host = host_of(url);
    let server = if server_text.trim().is_empty() {
        String::new()
    } else {
        format!(" ({})", server_text.trim())
    };
    format!(
        "Strong(er) authentication required (result code 8){server}: the server refuses a \
         password bind over an unencrypted connection. In [ldap] set url = \"ldaps://{host}\", \
         or keep url = \"{url}\" and set starttls = true; if the system does not trust the \
         server's certificate, also set tls_ca_file to the PEM file of the CA that issued it"
    )
}

/// The message for a bind refused with result code 49 (invalidCredentials). Active Directory
/// (and Samba) put the reason in the text as `data 52e` and the like; it is spelled out.
pub fn invalid_credentials(password_file: Option<&Path>, server_text: &str) -> String {
    let file = password_file
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default();
    let mut message =
        format!("invalid credentials (result code 49): check bind_dn and the password file{file}");
    if let Some(reason) = ad_bind_reason(server_text) {
        message.push_str(&format!("; Active Directory says: {reason}"));
    }
    if !server_text.trim().is_empty() {
        message.push_str(&format!(" (server: {})", server_text.trim()));
    }
    message
}

/// The reason behind an Active Directory bind failure (the `data XXX` code in the text of
/// result code 49), in words.
pub fn ad_bind_reason(server_text: &str) -> Option<&'static str> {
    let lower = server_text.to_ascii_lowercase();
    let code = lower
        .split("data ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_hexdigit())
        .next()?;
    Some(match code {
        "525" => "no such user (data 525): bind_dn names no account",
        "52e" => "wrong password (data 52e)",
        "530" => "the account may not log on at this time (data 530)",
        "531" => "the account may not log on from this workstation (data 531)",
        "532" => "the password has expired (data 532)",
        "533" => "the account is disabled (data 533)",
        "701" => "the account has expired (data 701)",
        "773" => "the password must be changed before the account can be used (data 773)",
        "775" => "the account is locked out (data 775)",
        _ => return None,
    })
}

/// The message for a connection that failed because the server's certificate was refused, if
/// `error` is such a failure (a rustls error inside the I/O error ldap3 reports).
pub fn certificate_problem(
    error: &ldap3::LdapError,
    url: &str,
    tls_ca_file: Option<&Path>,
) -> Option<String> {
    let ldap3::LdapError::Io { source } = error else {
        return None;
    };
    let tls = source.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(problem) = tls else {
        return None;
    };
    use rustls::CertificateError as C;
    let advice = match problem {
        C::UnknownIssuer | C::BadSignature => match tls_ca_file {
            Some(file) => format!(
                "the server's certificate was not issued by a CA coursegate trusts (the system's \
                 or tls_ca_file {}): set tls_ca_file to the PEM file of the CA that issued it",
                file.display()
            ),
            None => "the server's certificate was not issued by a CA the system trusts: set \
                     [ldap] tls_ca_file to the PEM file of the CA that issued it"
                .to_string(),
        },
        C::NotValidForName | C::NotValidForNameContext { .. } => format!(
            "the server's certificate is not valid for the host `{}` in url: use a host name \
             (or IP address) that the certificate names",
            host_of(url)
        ),
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            "the server's certificate has expired or is not valid yet (check the clocks and \
             the certificate's dates)"
                .to_string()
        }
        _ => "the server's certificate was refused".to_string(),
    };
    Some(format!("{advice} ({tls})"))
}

/// The host (and port, if not a default one) of an `ldap://` or `ldaps://` URL.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .strip_suffix(":389")
        .or_else(|| authority.strip_suffix(":636"))
        .unwrap_or(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stronger_auth_says_which_keys_to_set() {
        let m = stronger_auth_required(
            "ldap://dc1.region.se",
            "BindSimple: Transport encryption required.",
        );
        assert!(m.starts_with("Strong(er) authentication required"), "{m}");
        assert!(m.contains("url = \"ldaps://dc1.region.se\""), "{m}");
        assert!(m.contains("starttls = true"), "{m}");
        assert!(m.contains("tls_ca_file"), "{m}");
        assert!(m.contains("Transport encryption required"), "{m}");
        // The default port is dropped: ldaps:// has its own.
        assert!(
            stronger_auth_required("ldap://127.0.0.1:389/", "").contains("\"ldaps://127.0.0.1\"")
        );
    }

    #[test]
    fn active_directory_bind_codes_are_spelled_out() {
        let text = "80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, data 533, v1db1";
        assert_eq!(
            ad_bind_reason(text),
            Some("the account is disabled (data 533)")
        );
        assert_eq!(
            ad_bind_reason("AcceptSecurityContext error, data 52e, v4563"),
            Some("wrong password (data 52e)")
        );
        assert_eq!(ad_bind_reason("Invalid credentials"), None);
        let m = invalid_credentials(Some(Path::new("/run/ldap-password")), text);
        assert!(m.contains("invalid credentials"), "{m}");
        assert!(m.contains("/run/ldap-password"), "{m}");
        assert!(m.contains("disabled"), "{m}");
    }

    #[test]
    fn certificate_problems_name_the_fix() {
        let io = |e: rustls::Error| ldap3::LdapError::Io {
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        };
        let unknown = io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let m = certificate_problem(&unknown, "ldaps://dc1", None).unwrap();
        assert!(m.contains("tls_ca_file"), "{m}");
        let m = certificate_problem(&unknown, "ldaps://dc1", Some(Path::new("/etc/ca.pem")));
        assert!(m.unwrap().contains("/etc/ca.pem"));
        let name = io(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ));
        let m = certificate_problem(&name, "ldaps://localhost:636", None).unwrap();
        assert!(m.contains("`localhost`"), "{m}");
        let other = ldap3::LdapError::Io {
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        };
        assert_eq!(certificate_problem(&other, "ldaps://dc1", None), None);
    }
}
