//! Byte-preserving edits of JSON text: find the span of a member of an object and replace,
//! insert or remove it, leaving every other byte as it was. `restore` uses this to give back a
//! source `config.json` byte for byte except its `quantization_config`.

use std::ops::Range;

use crate::error::{Error, Result};

/// One `"key": value` member of an object: the decoded key, the byte range of the whole member
/// (from the key's opening quote to the end of the value) and of the value alone.
#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub key: String,
    pub member: Range<usize>,
    pub value: Range<usize>,
}

fn bad(path: &str, at: usize, what: &str) -> Error {
    Error::checkpoint(path, format!("JSON text: {what} at byte {at}"))
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end (exclusive) of the string starting at `b[i] == '"'`.
fn skip_string(path: &str, b: &[u8], mut i: usize) -> Result<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(bad(path, i, "unterminated string"))
}

/// The end (exclusive) of the value starting at `b[i]` (no leading whitespace).
fn skip_value(path: &str, b: &[u8], i: usize) -> Result<usize> {
    match b.get(i) {
        Some(b'"') => skip_string(path, b, i),
        Some(b'{') | Some(b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(path, b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err(bad(path, j, "unterminated object or array"))
        }
        Some(_) => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                j += 1;
            }
            if j == i {
                return Err(bad(path, i, "expected a value"));
            }
            Ok(j)
        }
        None => Err(bad(path, i, "expected a value")),
    }
}

/// The members of the object whose `{` is at `start`, and the offset of its closing `}`.
pub(crate) fn members(path: &str, text: &str, start: usize) -> Result<(Vec<Member>, usize)> {
    let b = text.as_bytes();
    if b.get(start) != Some(&b'{') {
        return Err(bad(path, start, "expected an object"));
    }
    let mut out = Vec::new();
    let mut i = skip_ws(b, start + 1);
    if b.get(i) == Some(&b'}') {
        return Ok((out, i));
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return Err(bad(path, i, "expected a key"));
        }
        let kend = skip_string(path, b, i)?;
        let key: String = serde_json::from_str(&text[i..kend]).map_err(|_| bad(path, i, "bad key"))?;
        let colon = skip_ws(b, kend);
        if b.get(colon) != Some(&b':') {
            return Err(bad(path, colon, "expected `:`"));
        }
        let vstart = skip_ws(b, colon + 1);
        let vend = skip_value(path, b, vstart)?;
        out.push(Member { key, member: i..vend, value: vstart..vend });
        let j = skip_ws(b, vend);
        match b.get(j) {
            Some(b',') => i = skip_ws(b, j + 1),
            Some(b'}') => return Ok((out, j)),
            _ => return Err(bad(path, j, "expected `,` or `}`")),
        }
    }
}

/// The top-level object's members and closing brace.
pub(crate) fn top_members(path: &str, text: &str) -> Result<(Vec<Member>, usize)> {
    members(path, text, skip_ws(text.as_bytes(), 0))
}

/// `text` with the top-level member `key` set to the JSON text `value` (replaced in place when it
/// exists, appended as the last member otherwise), or removed when `value` is `None`. Every other
/// byte is kept.
pub(crate) fn set_member(path: &str, text: &str, key: &str, value: Option<&str>) -> Result<String> {
    let (ms, close) = top_members(path, text)?;
    let found = ms.iter().position(|m| m.key == key);
    let mut out = String::with_capacity(text.len() + value.map_or(0, str::len) + 32);
    match (found, value) {
        (Some(i), Some(v)) => {
            let r = &ms[i].value;
            out.push_str(&text[..r.start]);
            out.push_str(v);
            out.push_str(&text[r.end..]);
        }
        (Some(i), None) => {
            // Remove the member and one adjacent comma (the preceding one, or the following one
            // when it is the first member).
            let (cut_start, cut_end) = if i > 0 {
                (ms[i - 1].member.end, ms[i].member.end)
            } else if ms.len() > 1 {
                (ms[0].member.start, ms[1].member.start)
            } else {
                (ms[0].member.start, ms[0].member.end)
            };
            out.push_str(&text[..cut_start]);
            out.push_str(&text[cut_end..]);
        }
        (None, Some(v)) => {
            let key_json = serde_json::to_string(key).map_err(|e| Error::checkpoint(path, e))?;
            match ms.last() {
                Some(last) => {
                    // Reuse the indentation of the last member.
                    let line_start = text[..last.member.start].rfind('\n').map_or(0, |p| p + 1);
                    let indent = &text[line_start..last.member.start];
                    let sep = if indent.chars().all(|c| c == ' ' || c == '\t') && line_start > 0 {
                        format!(",\n{indent}")
                    } else {
                        ", ".to_string()
                    };
                    out.push_str(&text[..last.member.end]);
                    out.push_str(&sep);
                    out.push_str(&key_json);
                    out.push_str(": ");
                    out.push_str(v);
                    out.push_str(&text[last.member.end..]);
                }
                None => {
                    out.push_str(&text[..close]);
                    out.push_str(&key_json);
                    out.push_str(": ");
                    out.push_str(v);
                    out.push_str(&text[close..]);
                }
            }
        }
        (None, None) => out.push_str(text),
    }
    Ok(out)
}

/// The text of the top-level member `key`'s value, if present.
pub(crate) fn member_text<'a>(path: &str, text: &'a str, key: &str) -> Result<Option<&'a str>> {
    let (ms, _) = top_members(path, text)?;
    Ok(ms.iter().find(|m| m.key == key).map(|m| &text[m.value.clone()]))
}

/// Pretty JSON (two-space indent, as Python's `json.dumps(indent=2)`), every line after the first
/// indented by `depth` levels so the text sits at that depth of an enclosing pretty document.
pub(crate) fn pretty_at(v: &serde_json::Value, depth: usize) -> String {
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    let pad = "  ".repeat(depth);
    text.replace('\n', &format!("\n{pad}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_other_bytes() {
        let t = "{\n  \"a\": 1,\n  \"q\": {\"x\": [1, \"}\"]},\n  \"z\": 1e-05\n}\n";
        assert_eq!(member_text("t", t, "q").unwrap(), Some("{\"x\": [1, \"}\"]}"));
        let r = set_member("t", t, "q", Some("null")).unwrap();
        assert_eq!(r, "{\n  \"a\": 1,\n  \"q\": null,\n  \"z\": 1e-05\n}\n");
        let r = set_member("t", t, "q", None).unwrap();
        assert_eq!(r, "{\n  \"a\": 1,\n  \"z\": 1e-05\n}\n");
        let r = set_member("t", t, "a", None).unwrap();
        assert_eq!(r, "{\n  \"q\": {\"x\": [1, \"}\"]},\n  \"z\": 1e-05\n}\n");
        let r = set_member("t", t, "n", Some("2")).unwrap();
        assert_eq!(r, "{\n  \"a\": 1,\n  \"q\": {\"x\": [1, \"}\"]},\n  \"z\": 1e-05,\n  \"n\": 2\n}\n");
        assert_eq!(set_member("t", "{}", "n", Some("2")).unwrap(), "{\"n\": 2}");
        assert_eq!(set_member("t", "{\"n\": 1}", "n", None).unwrap(), "{}");
        assert!(top_members("t", "[1]").is_err());
        assert!(top_members("t", "{\"a\": ").is_err());
    }
}
