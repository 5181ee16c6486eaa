//! Distinguished names and filter values: RFC 4515 filter escaping and a DN normal form.
//!
//! Directory servers return DNs in whatever case and spacing they were written with, and
//! escape characters in several equivalent ways (`\,` or `\2C`). Comparing them as strings would
//! make coursegate grant or revoke the same membership over and over, so every DN that is used
//! as an identity goes through [`normalize`] first.

/// Escapes a value for use inside an LDAP search filter (RFC 4515): `*`, `(`, `)`, `\`, NUL and
/// other control characters become `\XX`. Names are data, never filter syntax.
pub fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' | '(' | ')' | '\\' | '\0' => out.push_str(&format!("\\{:02x}", c as u32)),
            c if c.is_ascii_control() => out.push_str(&format!("\\{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Builds the filter for one user from the configured template (`{user}` is replaced by the
/// escaped name).
pub fn user_filter(template: &str, user: &str) -> String {
    template.replace("{user}", &escape_filter_value(user))
}

/// Escapes an attribute value for use in a DN (RFC 4514).
pub fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// The normal form of a DN used for comparisons: attribute types and values lower-cased,
/// insignificant spaces removed, escapes decoded and written back one canonical way, and the
/// parts of a multi-valued RDN sorted. Not a full schema-aware matcher, but it makes every
/// spelling of the same DN that real servers produce compare equal.
pub fn normalize(dn: &str) -> String {
    normalize_plain(dn).unwrap_or_else(|| normalize_general(dn))
}

fn normalize_general(dn: &str) -> String {
    let rdns: Vec<String> = split_unescaped(dn, ',')
        .into_iter()
        .filter(|r| !r.trim().is_empty())
        .map(|rdn| {
            let mut parts: Vec<String> = split_unescaped(&rdn, '+')
                .into_iter()
                .map(|ava| normalize_ava(&ava))
                .collect();
            parts.sort();
            parts.join("+")
        })
        .collect();
    rdns.join(",")
}

/// The common case without escapes, multi-valued RDNs or special characters, done without the
/// general parser (the daemon normalizes every member of every group on each pass). Returns
/// `None` when the general parser is needed; when it returns a value, it is exactly what the
/// general parser would produce (a unit test compares both).
fn normalize_plain(dn: &str) -> Option<String> {
    if dn
        .bytes()
        .any(|b| matches!(b, b'\\' | b'+' | b'"' | b'#' | b';' | b'<' | b'>' | b'\0'))
    {
        return None;
    }
    let mut out = String::with_capacity(dn.len());
    for rdn in dn.split(',') {
        if rdn.trim().is_empty() {
            continue;
        }
        let (ty, value) = rdn.split_once('=')?;
        if value.contains('=') {
            return None;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let ty = ty.trim().to_ascii_lowercase();
        out.push_str(ty.strip_prefix("oid.").unwrap_or(&ty));
        out.push('=');
        out.push_str(&value.trim_start().trim_end_matches(' ').to_lowercase());
    }
    Some(out)
}

fn normalize_ava(ava: &str) -> String {
    let (ty, value) = match find_unescaped(ava, '=') {
        Some(i) => (&ava[..i], &ava[i + 1..]),
        None => return ava.trim().to_lowercase(),
    };
    let ty = ty.trim().to_ascii_lowercase();
    let ty = ty.strip_prefix("oid.").unwrap_or(&ty).to_string();
    let value = value.trim_start();
    if value.starts_with('#') {
        return format!("{ty}={}", value.trim().to_ascii_lowercase());
    }
    format!("{ty}={}", escape_dn_value(&unescape(value).to_lowercase()))
}

/// Decodes RFC 4514 escapes and trims unescaped trailing spaces.
fn unescape(value: &str) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let raw = value.as_bytes();
    let mut i = 0;
    // Index just past the last character that must be kept (escaped or non-space).
    let mut keep = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            // Exactly two hex digits (`from_str_radix` alone would also take `\+0` for a NUL).
            let hex = raw
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    bytes.push(b);
                    i += 3;
                }
                None => {
                    bytes.push(raw[i + 1]);
                    i += 2;
                }
            }
            keep = bytes.len();
        } else {
            bytes.push(raw[i]);
            if raw[i] != b' ' {
                keep = bytes.len();
            }
            i += 1;
        }
    }
    bytes.truncate(keep);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn find_unescaped(s: &str, sep: char) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            return Some(i);
        }
    }
    None
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            current.push(c);
            escaped = true;
        } else if c == sep {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_are_escaped() {
        assert_eq!(escape_filter_value("*"), "\\2a");
        assert_eq!(escape_filter_value("a)(uid=*"), "a\\29\\28uid=\\2a");
        assert_eq!(escape_filter_value("\\2a"), "\\5c2a");
        assert_eq!(escape_filter_value("a\0b"), "a\\00b");
        assert_eq!(escape_filter_value("örjan.åström"), "örjan.åström");
        assert_eq!(user_filter("(uid={user})", "x*"), "(uid=x\\2a)");
    }

    #[test]
    fn equivalent_dns_normalize_equal() {
        let a = normalize("CN=Andersson\\, Anna,OU=People, DC=Example,DC=org");
        let b = normalize("cn=andersson\\2c anna,ou=people,dc=example,dc=org");
        assert_eq!(a, b);
        assert_eq!(a, "cn=andersson\\, anna,ou=people,dc=example,dc=org");
        assert_eq!(
            normalize("uid=Örjan.Åström,ou=people,dc=example,dc=org"),
            normalize("UID=örjan.åström , ou=people,dc=example,dc=org")
        );
        assert_eq!(
            normalize("uid=\\c3\\b6rjan,dc=x"),
            normalize("uid=örjan,dc=x")
        );
        assert_ne!(normalize("uid=a,dc=x"), normalize("uid=a\\,dc=x"));
        assert_eq!(normalize("cn=a+sn=b,dc=x"), normalize("SN=b+CN=a,dc=x"));
    }

    #[test]
    fn plain_fast_path_agrees_with_the_general_parser() {
        for dn in [
            "CN=Wim-Users, OU=Groups,DC=example,DC=org",
            "uid=Örjan.Åström,ou=people,dc=x",
            " uid = a b ,dc=x",
            "cn=x,,dc=y",
            "OID.2.5.4.3=x,dc=y",
            "uid=tab\tx,dc=y",
            "uid=\ttab ,dc=y",
            "uid=nul\0x,dc=y",
            "uid=back\\slash,dc=y",
        ] {
            let general = normalize_general(dn);
            assert_eq!(normalize(dn), general, "{dn}");
        }
        assert!(normalize_plain("cn=a\\,b,dc=x").is_none());
        assert!(normalize_plain("cn=a=b,dc=x").is_none());
    }

    #[test]
    fn active_directory_spellings_normalize_equal() {
        // How AD returns a DN, how an admin may type it, and the RFC 4514 hex forms.
        let ad = "CN=Andersson\\, Anna,OU=Radiologi,DC=region,DC=se";
        for other in [
            "cn=andersson\\2c anna, ou=radiologi, dc=region, dc=se",
            "CN=ANDERSSON\\2C ANNA,OU=RADIOLOGI,DC=REGION,DC=SE",
            "cn = Andersson\\, Anna , OU=Radiologi,DC=region,DC=se",
            "CN=\\41ndersson\\, Anna,OU=Radiologi,DC=region,DC=se",
        ] {
            assert_eq!(normalize(ad), normalize(other), "{other}");
        }
        // Non-ASCII: UTF-8 as it is, or escaped byte by byte in either hex case; and the case
        // of non-ASCII letters is folded too (AD's naming attributes ignore case).
        let swedish = normalize("CN=Åström\\, Örjan,OU=Röntgen,DC=region,DC=se");
        for other in [
            "CN=\\C3\\85str\\C3\\B6m\\2C \\C3\\96rjan,OU=R\\C3\\B6ntgen,DC=region,DC=se",
            "cn=\\c3\\85str\\c3\\b6m\\2c \\c3\\96rjan,ou=r\\c3\\b6ntgen,dc=region,dc=se",
            "cn=åström\\, örjan,ou=röntgen,dc=region,dc=se",
            "CN=ÅSTRÖM\\, ÖRJAN,OU=RÖNTGEN,DC=REGION,DC=SE",
        ] {
            assert_eq!(swedish, normalize(other), "{other}");
        }
        // An escaped comma is part of the value; an unescaped one separates RDNs.
        assert_ne!(
            normalize("CN=Andersson\\, Anna,DC=se"),
            normalize("CN=Andersson, Anna,DC=se")
        );
        assert_ne!(
            normalize("CN=Anna Andersson,DC=se"),
            normalize("CN=AnnaAndersson,DC=se")
        );
        assert_ne!(normalize("CN=Ann,DC=se"), normalize("CN=Anna,DC=se"));
        // `\+` escapes a plus sign; the `0` after it is not a hex digit of it.
        assert_eq!(normalize("CN=a\\+0,DC=se"), "cn=a\\+0,dc=se");
        assert_ne!(normalize("CN=\\+0,DC=se"), normalize("CN=\\00,DC=se"));
    }

    /// Every byte of `value` as a `\XX` escape, hex digits in upper or lower case.
    fn hex_escaped(value: &str, upper: bool) -> String {
        value
            .bytes()
            .map(|b| {
                if upper {
                    format!("\\{b:02X}")
                } else {
                    format!("\\{b:02x}")
                }
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// However a server or an admin escapes a name, it normalizes to one form; and names
        /// that differ (beyond case) never collide.
        #[test]
        fn escaping_never_changes_identity(
            a in "[a-zA-Z0-9 ,+\"\\\\<>;=#åÅöÖéÉ\u{1F600}]{1,12}",
            b in "[a-zA-Z0-9 ,+\"\\\\<>;=#åÅöÖéÉ\u{1F600}]{1,12}",
            upper in proptest::bool::ANY,
        ) {
            let dn = |v: &str| format!("CN={},OU=People,DC=region,DC=se", escape_dn_value(v));
            let hex = format!("cn={}, ou=people, dc=REGION, dc=se", hex_escaped(&a, upper));
            proptest::prop_assert_eq!(normalize(&dn(&a)), normalize(&hex));
            proptest::prop_assert_eq!(normalize(&dn(&a)), normalize(&normalize(&dn(&a))));
            if a.to_lowercase() != b.to_lowercase() {
                proptest::prop_assert_ne!(normalize(&dn(&a)), normalize(&dn(&b)));
            }
        }
    }

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn_value("Andersson, Anna"), "Andersson\\, Anna");
        assert_eq!(escape_dn_value("#x "), "\\#x\\ ");
        assert_eq!(escape_dn_value("a+b=c"), "a\\+b\\=c");
    }
}
