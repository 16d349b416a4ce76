//! Token estimates without a tokenizer: a text's characters counted by class, each class
//! weighted by the tokens one of its characters costs on average in `o200k_base` (the
//! tokenizer of GPT-4o and later models).
//!
//! | class    | characters                                                   | tokens each |
//! |----------|--------------------------------------------------------------|------------:|
//! | `word`   | ASCII letters and whitespace (space, tab, CR, LF)            | 0.21 |
//! | `symbol` | the rest of ASCII: digits, punctuation, control characters   | 0.63 |
//! | `cjk`    | kana and CJK punctuation U+3000–30FF, Han U+3400–9FFF, Hangul U+AC00–D7FF, fullwidth forms U+FF00–FFFF | 0.74 |
//! | `other`  | every other character below U+10000: accented Latin, Greek, Cyrillic, Hebrew, Arabic, Indic, Thai, typographic punctuation | 0.34 |
//! | `astral` | U+10000 and above: emoji, rare ideographs                    | 1.9 |
//!
//! The weights are fitted on the prompts of `tests/corpus/` (`tests/estimate.rs` measures
//! them against the tokenizer; `docs/rate-limits.md` has the error per script). Fitting one
//! weight per ASCII letter, digit, space and punctuation gave letters and spaces the same
//! weight, and digits and punctuation the same, so ASCII needs one count besides its length:
//! its symbols, counted a 255-byte lane at a time (vectorized). A non-ASCII character's class
//! is read from its UTF-8 lead byte (for U+3xxx, U+Axxx and U+Fxxx, with the byte after it),
//! so text is never decoded.

/// Tokens per character of each class, in thousandths.
const WORD: u64 = 210;
const SYMBOL: u64 = 630;
const CJK: u64 = 740;
const OTHER: u64 = 340;
const ASTRAL: u64 = 1900;

/// Characters of a text, by class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub word: usize,
    pub symbol: usize,
    pub cjk: usize,
    pub other: usize,
    pub astral: usize,
}

/// The estimated tokens of plain UTF-8 text (not JSON: escapes are not decoded). A character
/// is counted at its first byte, so invalid UTF-8 is counted too, never refused. Text given
/// in pieces ([`Counts::add_utf8`] each, then [`Counts::tokens`] once) counts as the whole
/// when the pieces are cut between characters; a cut inside a character can only move that
/// one character between `cjk` and `other`.
pub fn text_tokens(text: &[u8]) -> u64 {
    let mut c = Counts::default();
    c.add_utf8(text);
    c.tokens()
}

impl Counts {
    /// The estimate: the weighted sum, rounded up (0 for no text).
    pub fn tokens(&self) -> u64 {
        let milli = self.word as u64 * WORD
            + self.symbol as u64 * SYMBOL
            + self.cjk as u64 * CJK
            + self.other as u64 * OTHER
            + self.astral as u64 * ASTRAL;
        milli.div_ceil(1000)
    }

    pub fn chars(&self) -> usize {
        self.word + self.symbol + self.cjk + self.other + self.astral
    }

    pub fn add(&mut self, o: &Counts) {
        self.word += o.word;
        self.symbol += o.symbol;
        self.cjk += o.cjk;
        self.other += o.other;
        self.astral += o.astral;
    }

    /// One character.
    pub fn add_char(&mut self, c: char) {
        match c {
            'a'..='z' | 'A'..='Z' | ' ' | '\t' | '\n' | '\r' => self.word += 1,
            '\0'..='\x7f' => self.symbol += 1,
            '\u{3000}'..='\u{30ff}'
            | '\u{3400}'..='\u{9fff}'
            | '\u{ac00}'..='\u{d7ff}'
            | '\u{ff00}'..='\u{ffff}' => self.cjk += 1,
            '\u{80}'..='\u{ffff}' => self.other += 1,
            _ => self.astral += 1,
        }
    }

    /// Text known to be ASCII (a non-ASCII byte would count as one symbol).
    pub fn add_ascii(&mut self, text: &[u8]) {
        let symbols = symbols(text);
        self.symbol += symbols;
        self.word += text.len() - symbols;
    }

    /// UTF-8 text, ASCII or not.
    pub fn add_utf8(&mut self, text: &[u8]) {
        let mut rest = text;
        while !rest.is_empty() {
            // ASCII runs (spaces, digits, Latin words between CJK) take the fast path.
            let ascii = rest
                .iter()
                .position(|b| !b.is_ascii())
                .unwrap_or(rest.len());
            self.add_ascii(&rest[..ascii]);
            rest = &rest[ascii..];
            let run = rest.iter().position(u8::is_ascii).unwrap_or(rest.len());
            for (i, &b) in rest[..run].iter().enumerate() {
                let next = rest.get(i + 1).copied().unwrap_or(0);
                match b {
                    // Continuation bytes: the character was counted at its lead byte.
                    0x80..=0xbf => {}
                    0xc0..=0xdf => self.other += 1,
                    0xe3 if matches!(next, 0x80..=0x83 | 0x90..=0xbf) => self.cjk += 1,
                    0xea if next >= 0xb0 => self.cjk += 1,
                    0xef if next >= 0xbc => self.cjk += 1,
                    0xe4..=0xe9 | 0xeb..=0xed => self.cjk += 1,
                    0xe0..=0xef => self.other += 1,
                    _ => self.astral += 1,
                }
            }
            rest = &rest[run..];
        }
    }
}

/// ASCII bytes other than letters and whitespace, counted in byte-wide lanes.
fn symbols(text: &[u8]) -> usize {
    text.chunks(255)
        .map(|c| usize::from(c.iter().fold(0u8, |n, &b| n + u8::from(is_symbol(b)))))
        .sum()
}

fn is_symbol(b: u8) -> bool {
    let letter = (b | 0x20).wrapping_sub(b'a') < 26;
    let space = b == b' ' || b == b'\n' || b == b'\t' || b == b'\r';
    !letter && !space
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn of_str(s: &str) -> Counts {
        let mut c = Counts::default();
        s.chars().for_each(|ch| c.add_char(ch));
        c
    }

    fn of_utf8(b: &[u8]) -> Counts {
        let mut c = Counts::default();
        c.add_utf8(b);
        c
    }

    /// Reading the bytes classes every character as its code point does.
    #[test]
    fn bytes_class_as_chars_do() {
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let mut buf = [0; 4];
            assert_eq!(
                of_utf8(c.encode_utf8(&mut buf).as_bytes()),
                of_str(&c.to_string()),
                "{c:?}"
            );
        }
        for b in 0..0x80u8 {
            let mut c = Counts::default();
            c.add_ascii(&[b]);
            assert_eq!(c, of_utf8(&[b]), "{b:#x}");
        }
    }

    #[test]
    fn classes() {
        let c = of_utf8("Hi, 42 \t\n".as_bytes());
        assert_eq!((c.word, c.symbol), (6, 3));
        let c = of_utf8("東京、ひらがな、カタカナ、한국어，ＡＢ".as_bytes());
        assert_eq!(c.cjk, c.chars());
        let c = of_utf8("café — Привет, ㄅ 〒".as_bytes());
        assert_eq!((c.word, c.symbol, c.other, c.cjk), (7, 1, 9, 1));
        assert_eq!(of_utf8("😀𠀀".as_bytes()).astral, 2);
    }

    #[test]
    fn weighs_scripts() {
        assert_eq!(text_tokens(b""), 0);
        // 21 letters and 6 spaces: 27 × 0.21 = 5.67.
        assert_eq!(text_tokens(b"the cat sat on the warm mat"), 6);
        // 11 ideographs: 11 × 0.74 = 8.14. Characters / 4 said 3.
        assert_eq!(text_tokens("今天天气很好我们去公园".as_bytes()), 9);
        // 2 × 0.63 + 0.21 + 0.34 + 1.9 = 3.71.
        assert_eq!(text_tokens("4,aé😀".as_bytes()), 4);
    }

    #[test]
    fn invalid_utf8_is_counted_not_refused() {
        assert_eq!(of_utf8(b"\xff\xfe").astral, 2);
        assert_eq!(of_utf8(b"\xe4").cjk, 1);
        assert_eq!(of_utf8(b"\x80\x80").chars(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text, split anywhere between characters, counts as its characters do.
        #[test]
        fn matches_chars(s in "(\\PC|[\\p{Han}\\p{Hiragana}\\p{Katakana}\\p{Hangul}a-z0-9 \n.,{}])*", cut in any::<prop::sample::Index>()) {
            let b = s.as_bytes();
            prop_assert_eq!(of_utf8(b), of_str(&s));
            let at = s.char_indices().map(|(i, _)| i).nth(cut.index(s.chars().count() + 1)).unwrap_or(b.len());
            let mut c = of_utf8(&b[..at]);
            c.add(&of_utf8(&b[at..]));
            prop_assert_eq!(c, of_str(&s));
        }
    }
}
