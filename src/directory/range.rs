//! Ranged attribute retrieval (Active Directory's answer to groups with many members).
//!
//! Active Directory returns at most MaxValRange (1,500 by default) values of an attribute per
//! read. A client asks for `member;range=0-1499` and gets `member;range=0-1499` back (more
//! follow) or `member;range=<low>-*` (the last values); then it asks for the next range, and so
//! on (MS-ADTS 3.1.1.3.1.3.3). This module only builds and parses those attribute names; the
//! reading loop is [`super::Directory::read_members`].

/// The end of a range the server returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeEnd {
    /// `low-high`: values up to index `high` (inclusive) were returned, more may follow.
    Upto(u64),
    /// `low-*`: these were the last values.
    Last,
}

/// A range the server returned: the index of its first value and its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub low: u64,
    pub end: RangeEnd,
}

/// `attr;range=low-high`, the request for `size` values starting at `low`.
pub fn request(attr: &str, low: u64, size: u64) -> String {
    let high = low.saturating_add(size.max(1) - 1);
    format!("{attr};range={low}-{high}")
}

/// `attr;range=low-*`: the request for whatever the server will return from `low` on.
pub fn request_rest(attr: &str, low: u64) -> String {
    format!("{attr};range={low}-*")
}

/// If `returned` (an attribute description from a search result) is `attr` with a range
/// option, the range; `Some(Err(..))` if the range option cannot be read. Attribute names and
/// options are compared case-insensitively; other options (`;binary`) are not ranges.
pub fn parse(attr: &str, returned: &str) -> Option<Result<Range, String>> {
    let (name, options) = returned.split_once(';')?;
    if !name.eq_ignore_ascii_case(attr) {
        return None;
    }
    let spec = options.split(';').find_map(|o| {
        o.get(..6)
            .filter(|p| p.eq_ignore_ascii_case("range="))
            .map(|_| &o[6..])
    })?;
    let bad = || format!("cannot read the value range `{returned}`");
    let Some((low, high)) = spec.split_once('-') else {
        return Some(Err(bad()));
    };
    let Ok(low) = low.parse::<u64>() else {
        return Some(Err(bad()));
    };
    let end = if high == "*" {
        RangeEnd::Last
    } else {
        match high.parse::<u64>() {
            Ok(high) if high >= low => RangeEnd::Upto(high),
            _ => return Some(Err(bad())),
        }
    };
    Some(Ok(Range { low, end }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(request("member", 0, 1500), "member;range=0-1499");
        assert_eq!(request("member", 100, 100), "member;range=100-199");
        assert_eq!(request("member", 7, 1), "member;range=7-7");
        assert_eq!(request_rest("member", 1500), "member;range=1500-*");
    }

    #[test]
    fn ranges_the_server_returns() {
        assert_eq!(
            parse("member", "member;range=0-1499"),
            Some(Ok(Range {
                low: 0,
                end: RangeEnd::Upto(1499)
            }))
        );
        assert_eq!(
            parse("member", "Member;Range=1500-*"),
            Some(Ok(Range {
                low: 1500,
                end: RangeEnd::Last
            }))
        );
        assert_eq!(
            parse("uniqueMember", "uniquemember;binary;range=3-4"),
            Some(Ok(Range {
                low: 3,
                end: RangeEnd::Upto(4)
            }))
        );
        // Not a range of this attribute.
        assert_eq!(parse("member", "member"), None);
        assert_eq!(parse("member", "memberOf;range=0-10"), None);
        assert_eq!(parse("member", "member;binary"), None);
        // A range option that makes no sense is an error, never "no more values".
        assert!(matches!(parse("member", "member;range=5-2"), Some(Err(_))));
        assert!(matches!(parse("member", "member;range=x-*"), Some(Err(_))));
        assert!(matches!(parse("member", "member;range=12"), Some(Err(_))));
    }
}
