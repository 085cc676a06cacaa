//! Bounded quoting of text that came from outside (archive entry names, ZooKeeper node values,
//! file names a service user chose): whatever an error, a status field or a log line quotes from
//! less-trusted input is cut to a small prefix, so a hostile name cannot grow a message without
//! bound.

use std::borrow::Cow;

/// The most bytes of outside text that any message quotes.
pub const MAX_QUOTED_BYTES: usize = 200;

/// `text` as it may be quoted: unchanged when it is short, else its first bytes (cut on a
/// character boundary) followed by `…` and the full length in bytes.
pub fn clip(text: &str) -> Cow<'_, str> {
    clip_to(text, MAX_QUOTED_BYTES)
}

/// [`clip`] with an explicit bound.
pub fn clip_to(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes {
        return Cow::Borrowed(text);
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…({} bytes)", &text[..end], text.len()))
}

/// [`clip`] for bytes that need not be UTF-8 (tar names, node data): lossy, then cut.
pub fn clip_bytes(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(MAX_QUOTED_BYTES)];
    let shown = String::from_utf8_lossy(head);
    if bytes.len() <= MAX_QUOTED_BYTES {
        shown.into_owned()
    } else {
        format!("{shown}…({} bytes)", bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_unchanged() {
        assert_eq!(clip("web.toml"), "web.toml");
        assert_eq!(clip_bytes(b"a/b"), "a/b");
    }

    #[test]
    fn long_text_is_cut_and_says_how_long_it_was() {
        let long = "x".repeat(10_000);
        let shown = clip(&long);
        assert!(shown.len() < MAX_QUOTED_BYTES + 32, "{}", shown.len());
        assert!(shown.ends_with("…(10000 bytes)"), "{shown}");
        assert!(clip_bytes(long.as_bytes()).ends_with("…(10000 bytes)"));
    }

    #[test]
    fn cuts_on_a_character_boundary() {
        let long = "é".repeat(300);
        let shown = clip_to(&long, 5);
        assert!(shown.starts_with("éé…"), "{shown}");
    }
}
