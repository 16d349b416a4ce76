//! Token estimates without a tokenizer: a text's characters counted by class, each class
//! weighted by the tokens one of its characters costs on average in `o200k_base` (the
//! tokenizer of GPT-4o and later models).
//!
//! | class    | characters                                                   | tokens each |
//! |----------|--------------------------------------------------------------|------------:|
//! | `symbol` | ASCII digits and the punctuation among them, U+0021–0040: ``!"#$%&'()*+,-./0-9:;<=>?@`` | 0.68 |
//! | `word`   | the rest of ASCII: letters, whitespace, controls, ``[\]^_`{\|}~`` | 0.21 |
//! | `cjk`    | U+3000–D7FF (CJK punctuation, kana, Han, Yi, Hangul) and U+F000–FFFF (compatibility ideographs, fullwidth forms) | 0.74 |
//! | `other`  | every other character below U+10000: accented Latin, Greek, Cyrillic, Hebrew, Arabic, Indic, Thai, typographic punctuation | 0.34 |
//! | `astral` | U+10000 and above: emoji, rare ideographs                    | 1.9 |
//!
//! The weights are fitted on the prompts of `tests/corpus/` (`tests/estimate.rs` measures
//! them against the tokenizer; `docs/rate-limits.md` has the error per script). Fitting one
//! weight per ASCII letter, digit, space and punctuation gave letters and spaces nearly the
//! same weight, and digits and punctuation the same; putting ``[\]^_`{|}~`` with the letters
//! fitted as well (no script moved by more than 3 points) and makes a symbol one range of
//! bytes. So ASCII needs one count besides its length, a range test per byte. A non-ASCII
//! character's class is read from its UTF-8 lead byte alone (the `cjk` ranges are whole lead
//! bytes, E3–ED and EF; the few non-CJK characters in them, such as Yi or the emoji
//! variation selector, are rare), so text is never decoded. Both are counted with
//! branch-free range tests summed in byte-wide lanes, 224 bytes at a time, which the
//! compiler vectorizes.

/// Tokens per character of each class, in thousandths.
const WORD: u64 = 210;
const SYMBOL: u64 = 680;
const CJK: u64 = 740;
const OTHER: u64 = 340;
const ASTRAL: u64 = 1900;
/// A number in the prompt: a token id (`prompt` or `input` given as arrays of token ids).
const NUMBER: u64 = 1000;

/// Characters of a text, by class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub word: usize,
    pub symbol: usize,
    pub cjk: usize,
    pub other: usize,
    pub astral: usize,
    /// Numbers: token ids, one token each.
    pub numbers: usize,
}

/// The estimated tokens of plain UTF-8 text (not JSON: escapes are not decoded). A character
/// is counted at its first byte, so invalid UTF-8 is counted too, never refused, and text
/// given in pieces ([`Counts::add_utf8`] for each, then [`Counts::tokens`] once) counts as
/// the whole, wherever the pieces were cut (inside a character too): streamed output can be
/// counted as it arrives.
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
            + self.astral as u64 * ASTRAL
            + self.numbers as u64 * NUMBER;
        milli.div_ceil(1000)
    }

    pub fn chars(&self) -> usize {
        self.word + self.symbol + self.cjk + self.other + self.astral + self.numbers
    }

    pub fn add(&mut self, o: &Counts) {
        self.word += o.word;
        self.symbol += o.symbol;
        self.cjk += o.cjk;
        self.other += o.other;
        self.astral += o.astral;
        self.numbers += o.numbers;
    }

    /// One character.
    pub fn add_char(&mut self, c: char) {
        match c {
            '!'..='@' => self.symbol += 1,
            '\0'..='\x7f' => self.word += 1,
            '\u{3000}'..='\u{d7ff}' | '\u{f000}'..='\u{ffff}' => self.cjk += 1,
            '\u{80}'..='\u{ffff}' => self.other += 1,
            _ => self.astral += 1,
        }
    }

    /// Text known to be ASCII (a non-ASCII byte would count as a `word` character).
    pub fn add_ascii(&mut self, text: &[u8]) {
        let symbols = symbols(text);
        self.symbol += symbols;
        self.word += text.len() - symbols;
    }

    /// UTF-8 text, ASCII or not.
    pub fn add_utf8(&mut self, text: &[u8]) {
        if text.is_ascii() {
            return self.add_ascii(text);
        }
        let mut blocks = text.chunks_exact(BLOCK);
        for block in blocks.by_ref() {
            self.add_block(block);
        }
        self.add_block(blocks.remainder());
    }

    /// At most [`BLOCK`] bytes of UTF-8. Each character is counted at its lead byte;
    /// continuation bytes (80–BF) count nothing.
    fn add_block(&mut self, block: &[u8]) {
        let (mut ascii, mut symbol, mut lead, mut cjk, mut astral) = (0u8, 0u8, 0u8, 0u8, 0u8);
        for &b in block {
            ascii += u8::from(b < 0x80);
            symbol += u8::from(is_symbol(b));
            // C0–EF: U+0080–FFFF; E3–ED and EF: the CJK ranges; F0 and up: U+10000 and up.
            lead += u8::from(b.wrapping_sub(0xc0) < 0x30);
            cjk += u8::from(b.wrapping_sub(0xe3) < 0x0b) | u8::from(b == 0xef);
            astral += u8::from(b >= 0xf0);
        }
        self.word += usize::from(ascii - symbol);
        self.symbol += usize::from(symbol);
        self.cjk += usize::from(cjk);
        self.other += usize::from(lead - cjk);
        self.astral += usize::from(astral);
    }
}

/// Bytes summed per byte-wide lane before the lanes are added up: at most 255 (a lane must
/// not overflow), and a multiple of 32 so that no block ends in a scalar tail (224 takes
/// ~40 % fewer instructions than 255 on 1 KB).
const BLOCK: usize = 224;

/// ASCII symbols, counted in byte-wide lanes.
fn symbols(text: &[u8]) -> usize {
    let count = |c: &[u8]| usize::from(c.iter().fold(0u8, |n, &b| n + u8::from(is_symbol(b))));
    let mut blocks = text.chunks_exact(BLOCK);
    let full: usize = blocks.by_ref().map(count).sum();
    full + count(blocks.remainder())
}

/// U+0021–0040; one compare per 16 bytes once vectorized.
fn is_symbol(b: u8) -> bool {
    b.wrapping_sub(b'!') < 0x20
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
        // Brackets, braces and the rest of U+005B–0060 and U+007B–007F weigh as letters.
        let c = of_utf8(b"{a_b}[0]~");
        assert_eq!((c.word, c.symbol), (8, 1));
        let c = of_utf8("東京、ひらがな、カタカナ、한국어，ＡＢ".as_bytes());
        assert_eq!(c.cjk, c.chars());
        let c = of_utf8("café — Привет, ♥ 〒".as_bytes());
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
        // 2 × 0.68 + 0.21 + 0.34 + 1.9 = 3.81.
        assert_eq!(text_tokens("4,aé😀".as_bytes()), 4);
    }

    #[test]
    fn invalid_utf8_is_counted_not_refused() {
        assert_eq!(of_utf8(b"\xff\xfe").astral, 2);
        assert_eq!(of_utf8(b"\xe4").cjk, 1);
        assert_eq!(of_utf8(b"\xc3").other, 1);
        assert_eq!(of_utf8(b"\x80\x80").chars(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text, cut anywhere (inside a character too), counts as its characters do.
        #[test]
        fn matches_chars(
            s in "(\\PC|[\\p{Han}\\p{Hiragana}\\p{Katakana}\\p{Hangul}a-z0-9 \n.,{}])*",
            cut in any::<prop::sample::Index>(),
        ) {
            let b = s.as_bytes();
            prop_assert_eq!(of_utf8(b), of_str(&s));
            let at = cut.index(b.len() + 1);
            let mut c = of_utf8(&b[..at]);
            c.add(&of_utf8(&b[at..]));
            prop_assert_eq!(c, of_str(&s));
        }
    }
}
