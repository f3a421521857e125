//! BERT WordPiece tokenization for all-MiniLM-L6-v2, written to give the same ids as
//! HuggingFace `tokenizers` with the model's `tokenizer.json`: `BertNormalizer` (clean text,
//! spaces around CJK ideographs, NFD with accents stripped, lower case), `BertPreTokenizer`
//! (split on whitespace, isolate punctuation), `WordPiece` (`##` continuations, `[UNK]`, at most
//! 100 characters a word) and the template `[CLS] A [SEP]`.
//!
//! It is hand-written rather than the `tokenizers` crate so that the guest stays small: no regex
//! engine, no serde. The character classes come from `unicode_categories`, the very tables
//! `tokenizers` uses (Unicode 9.0), so that a character the current Unicode calls punctuation or
//! a mark but 9.0 did not know is treated as `tokenizers` treats it.

use std::fmt;

use unicode_categories::UnicodeCategories;
use unicode_normalization::char::{canonical_combining_class, decompose_canonical};

/// Words longer than this many characters become one `[UNK]`, as in `tokenizers`.
const MAX_INPUT_CHARS_PER_WORD: usize = 100;

/// The prefix that marks a piece continuing a word.
const CONTINUATION: &str = "##";

/// The tokens `tokenizer.json` lists as special added tokens. `tokenizers` finds them in the raw
/// text (case-sensitive, before normalization) and gives each its id instead of splitting
/// `[MASK]` into `[`, `mask`, `]`.
const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// A WordPiece vocabulary and the BERT rules around it, built once from `vocab.txt`.
///
/// It holds the vocabulary as one string with offsets and two sorted indexes, about 16 bytes a
/// token, and looks pieces up by binary search, so encoding allocates only the output and one
/// word buffer.
pub struct Tokenizer {
    tokens: Tokens,
    /// All ids, sorted by their text: the lookup of a piece that starts a word.
    heads: Vec<u32>,
    /// Ids of the tokens that begin with `##`, sorted by their text after the `##`: the lookup
    /// of a continuing piece without building `##piece` first.
    tails: Vec<u32>,
    /// The special tokens present in the vocabulary, matched in the raw text.
    specials: Vec<(&'static str, u32)>,
    /// The longest token in bytes; no longer piece can match.
    longest: usize,
    cls: u32,
    sep: u32,
    unk: u32,
    pad: u32,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The 30,000 tokens would drown any log line they appear in.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("cls", &self.cls)
            .field("sep", &self.sep)
            .field("unk", &self.unk)
            .field("pad", &self.pad)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Parses `vocab.txt` (one token per line, id = line number).
    ///
    /// Lines are read as `tokenizers` reads them: `\n` or `\r\n` ends a line and trailing
    /// whitespace is not part of the token. Fails on an empty file, on a token that appears
    /// twice and when `[CLS]`, `[SEP]`, `[UNK]` or `[PAD]` is missing.
    pub fn from_vocab(vocab: &str) -> Result<Tokenizer, String> {
        let mut text = String::with_capacity(vocab.len());
        let mut starts = vec![0u32];
        for line in vocab.lines() {
            text.push_str(line.trim_end());
            starts.push(u32::try_from(text.len()).map_err(|_| "vocabulary is over 4 GiB")?);
        }
        let tokens = Tokens { text, starts };
        let count = u32::try_from(tokens.len()).map_err(|_| "vocabulary has over 2^32 tokens")?;
        if count == 0 {
            return Err("vocabulary is empty: expected one token per line".into());
        }
        let mut heads: Vec<u32> = (0..count).collect();
        heads.sort_unstable_by(|&a, &b| tokens.get(a).cmp(tokens.get(b)));
        let twice = heads.windows(2).find_map(|pair| match *pair {
            [a, b] if tokens.get(a) == tokens.get(b) => Some((a.min(b), a.max(b))),
            _ => None,
        });
        if let Some((a, b)) = twice {
            let (line_a, line_b) = (u64::from(a) + 1, u64::from(b) + 1);
            return Err(format!("vocabulary has token {:?} twice, on lines {line_a} and {line_b}", tokens.get(a)));
        }
        // In `heads`' order, so sorted by the text after the common `##` too.
        let tails = heads.iter().copied().filter(|&id| tokens.get(id).starts_with(CONTINUATION)).collect();
        let find = |name: &str| tokens.lookup(&heads, name, 0);
        let required =
            |name: &str| find(name).ok_or_else(|| format!("vocabulary has no {name} token: is this a BERT vocab.txt?"));
        Ok(Tokenizer {
            cls: required("[CLS]")?,
            sep: required("[SEP]")?,
            unk: required("[UNK]")?,
            pad: required("[PAD]")?,
            specials: SPECIAL_TOKENS.iter().filter_map(|&name| find(name).map(|id| (name, id))).collect(),
            longest: (0..count).map(|id| tokens.get(id).len()).max().unwrap_or(0),
            tokens,
            heads,
            tails,
        })
    }

    /// The ids of `text`: `[CLS]`, its word pieces (the first `max_len - 2`), `[SEP]`.
    /// `max_len` >= 2.
    ///
    /// This is `tokenizers`' `encode(text)` with `enable_truncation(max_len)` and no padding, so
    /// a special token written in the text, such as `[MASK]`, gets its own id. Pad the result
    /// with [`Tokenizer::pad_id`] where a fixed length is needed. Unlike `tokenizers`, which
    /// ignores a limit too small for the two special tokens, a `max_len` below 2 is taken as 2.
    /// Work stops once the limit is reached, so a long text costs no more than its first
    /// `max_len` pieces.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<u32> {
        let budget = max_len.saturating_sub(2);
        let mut ids = Vec::with_capacity(budget.min(text.len()) + 2);
        ids.push(self.cls);
        let mut rest = text;
        while ids.len() <= budget {
            let Some((before, special, after)) = self.next_special(rest) else {
                self.encode_plain(rest, &mut ids, budget + 1);
                break;
            };
            if !self.encode_plain(before, &mut ids, budget + 1) {
                break;
            }
            if let Some(id) = special {
                ids.push(id);
            }
            rest = after;
        }
        ids.truncate(budget + 1);
        ids.push(self.sep);
        ids
    }

    /// How many tokens the vocabulary has; ids run from 0 to one less.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of `[PAD]`, for filling a batch to one length.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Splits `text` at its first special token: the text before it, the token's id and the text
    /// after it. None when there is none.
    fn next_special<'t>(&self, text: &'t str) -> Option<(&'t str, Option<u32>, &'t str)> {
        // All special tokens start with `[` and none is a prefix of another, so the first `[`
        // that starts one is the leftmost-longest match `tokenizers` finds.
        let mut from = 0;
        while let Some(offset) = text.get(from..).and_then(|t| t.find('[')) {
            let at = from + offset;
            let tail = text.get(at..).unwrap_or("");
            if let Some(&(name, id)) = self.specials.iter().find(|(name, _)| tail.starts_with(name)) {
                let before = text.get(..at).unwrap_or("");
                let after = text.get(at + name.len()..).unwrap_or("");
                return Some((before, Some(id), after));
            }
            from = at + 1;
        }
        None
    }

    /// Appends the pieces of `text`, which holds no special token, until `ids` has `limit`
    /// entries. Returns false when it stopped at the limit.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>, limit: usize) -> bool {
        let mut word = Word::default();
        for c in normalized(text) {
            if c.is_whitespace() {
                self.push_word(&mut word, ids);
            } else if is_punctuation(c) {
                self.push_word(&mut word, ids);
                word.push(c);
                self.push_word(&mut word, ids);
            } else {
                word.push(c);
            }
            if ids.len() >= limit {
                return false;
            }
        }
        self.push_word(&mut word, ids);
        ids.len() < limit
    }

    /// Appends the WordPiece ids of `word` and empties it: greedy longest match from the left,
    /// one `[UNK]` for the whole word when some part of it matches nothing.
    fn push_word(&self, word: &mut Word, ids: &mut Vec<u32>) {
        if word.chars == 0 {
            return;
        }
        if word.chars > MAX_INPUT_CHARS_PER_WORD {
            ids.push(self.unk);
            word.clear();
            return;
        }
        let text = word.text.as_str();
        let first = ids.len();
        let mut start = 0;
        while start < text.len() {
            let (index, skip) = if start == 0 { (&self.heads, 0) } else { (&self.tails, CONTINUATION.len()) };
            let mut end = floor_char_boundary(text, (start + self.longest.saturating_sub(skip)).min(text.len()));
            let mut found = None;
            while end > start {
                let piece = text.get(start..end).unwrap_or("");
                if let Some(id) = self.tokens.lookup(index, piece, skip) {
                    found = Some(id);
                    break;
                }
                end -= piece.chars().next_back().map_or(1, char::len_utf8);
            }
            let Some(id) = found else {
                ids.truncate(first);
                ids.push(self.unk);
                break;
            };
            ids.push(id);
            start = end;
        }
        word.clear();
    }
}

/// The vocabulary's texts, one string with offsets rather than 30,000 small allocations.
#[derive(Debug)]
struct Tokens {
    /// Every token's text, one after another.
    text: String,
    /// Token `id` is `text[starts[id]..starts[id + 1]]`; one more entry than there are tokens.
    starts: Vec<u32>,
}

impl Tokens {
    fn len(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// The text of token `id`; empty for an id out of range.
    fn get(&self, id: u32) -> &str {
        let id = id as usize;
        match (self.starts.get(id), self.starts.get(id + 1)) {
            (Some(&start), Some(&end)) => self.text.get(start as usize..end as usize).unwrap_or(""),
            _ => "",
        }
    }

    /// The id of the token whose text after its first `skip` bytes is `piece`, searching
    /// `index`, a list of ids sorted by that text.
    fn lookup(&self, index: &[u32], piece: &str, skip: usize) -> Option<u32> {
        index
            .binary_search_by(|&id| self.get(id).get(skip..).unwrap_or("").cmp(piece))
            .ok()
            .and_then(|at| index.get(at).copied())
    }
}

/// The word being gathered. Past the length limit only its characters are counted: such a word
/// becomes `[UNK]` whatever it holds.
#[derive(Debug, Default)]
struct Word {
    text: String,
    chars: usize,
}

impl Word {
    fn push(&mut self, c: char) {
        self.chars += 1;
        if self.chars <= MAX_INPUT_CHARS_PER_WORD {
            self.text.push(c);
        }
    }

    fn clear(&mut self) {
        self.text.clear();
        self.chars = 0;
    }
}

/// The largest char boundary of `text` at or below `at`.
fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// `BertNormalizer` with `clean_text`, `handle_chinese_chars`, `strip_accents` (which follows
/// `lowercase`) and `lowercase`, in `tokenizers`' order, as a lazy stream of characters.
fn normalized(text: &str) -> impl Iterator<Item = char> + '_ {
    let cleaned = text
        .chars()
        .filter(|&c| !(c == '\0' || c == '\u{FFFD}' || is_control(c)))
        .map(|c| if is_whitespace(c) { ' ' } else { c })
        .flat_map(|c| {
            let space = is_chinese_char(c).then_some(' ');
            [space, Some(c), space].into_iter().flatten()
        });
    Nfd { input: cleaned, buffer: Vec::new(), ready: 0, next: 0 }
        .filter(|c| !c.is_mark_nonspacing())
        // Character by character, as `tokenizers` does: a final capital sigma becomes σ, not ς.
        .flat_map(char::to_lowercase)
}

/// Canonical decomposition (NFD) of a stream of characters: each decomposed, then every run of
/// combining characters put in canonical order. This is what `unicode_normalization`'s `nfd()`
/// does; it is written out here because that iterator also handles compatibility
/// decomposition, which would link 70 KB of tables BERT never uses into the guest.
#[derive(Debug)]
struct Nfd<I> {
    input: I,
    /// Decomposed characters with their combining classes, in canonical order up to `ready`.
    buffer: Vec<(u8, char)>,
    ready: usize,
    /// The next character of `buffer[..ready]` to hand out.
    next: usize,
}

impl<I: Iterator<Item = char>> Nfd<I> {
    /// Puts the combining characters after the last starter in canonical order: by class,
    /// keeping the text's order within one class (`sort_by_key` is stable).
    fn order_pending(&mut self) {
        if let Some(pending) = self.buffer.get_mut(self.ready..) {
            pending.sort_by_key(|&(class, _)| class);
        }
        self.ready = self.buffer.len();
    }
}

impl<I: Iterator<Item = char>> Iterator for Nfd<I> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        loop {
            if self.next < self.ready {
                let c = self.buffer.get(self.next).map(|&(_, c)| c);
                self.next += 1;
                return c;
            }
            self.buffer.drain(..self.ready);
            (self.ready, self.next) = (0, 0);
            let Some(c) = self.input.next() else {
                if self.buffer.is_empty() {
                    return None;
                }
                self.order_pending();
                continue;
            };
            decompose_canonical(c, |d| {
                let class = canonical_combining_class(d);
                if class == 0 {
                    // A starter ends the run of combining characters before it; it and they
                    // can be handed out, since nothing after it reorders across it.
                    self.order_pending();
                }
                self.buffer.push((class, d));
                if class == 0 {
                    self.ready = self.buffer.len();
                }
            });
        }
    }
}

/// Whitespace for `clean_text`: Rust's (the Unicode White_Space property), which includes tab,
/// newline and carriage return.
fn is_whitespace(c: char) -> bool {
    c.is_whitespace()
}

/// A character `clean_text` removes: Cc, Cf or Co, except tab, newline and carriage return,
/// which count as whitespace.
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.is_other()
}

/// Punctuation for `BertPreTokenizer`: every ASCII punctuation character (which takes in `$`,
/// `+`, `<`, `=`, `>`, `^`, `` ` ``, `|` and `~`, symbols in Unicode) and Unicode's P*
/// categories. Other symbols, such as `€` or `∑`, stay inside a word.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.is_punctuation()
}

/// The ideograph ranges of `tokenizers`' `is_chinese_char`. They follow BERT's `_is_chinese_char`
/// except that Extension E starts at U+2B920 rather than U+2B820; `tokenizers` is the reference.
fn is_chinese_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nun\n##aff\n##able\nhello\nworld\n!\n,\n\
                         cafe\n北\n京\n##s\na\n##a\n€\n##50\nσ\n##σ\n";

    fn small() -> Tokenizer {
        Tokenizer::from_vocab(SMALL).unwrap()
    }

    fn id(t: &Tokenizer, token: &str) -> u32 {
        t.tokens.lookup(&t.heads, token, 0).unwrap()
    }

    fn ids(t: &Tokenizer, tokens: &[&str]) -> Vec<u32> {
        tokens.iter().map(|token| id(t, token)).collect()
    }

    #[test]
    fn splits_words_into_longest_pieces() {
        let t = small();
        assert_eq!(
            t.encode("unaffable hello, world!", 256),
            ids(&t, &["[CLS]", "un", "##aff", "##able", "hello", ",", "world", "!", "[SEP]"])
        );
    }

    #[test]
    fn a_word_with_an_unknown_part_is_one_unk() {
        let t = small();
        assert_eq!(t.encode("unafx hello", 256), ids(&t, &["[CLS]", "[UNK]", "hello", "[SEP]"]));
    }

    #[test]
    fn normalizes_accents_case_and_cjk() {
        let t = small();
        let expected = ids(&t, &["[CLS]", "cafe", "北", "京", "cafe", "σ", "##σ", "[SEP]"]);
        // NFC and NFD input, upper case, ideographs split without spaces, and a final capital
        // sigma lowered to σ (not ς) because `tokenizers` lowers one character at a time.
        assert_eq!(t.encode("CAFÉ北京Cafe\u{301} σΣ", 256), expected);
    }

    #[test]
    fn nfd_decomposes_and_orders_marks() {
        let nfd = |text: &str| Nfd { input: text.chars(), buffer: Vec::new(), ready: 0, next: 0 }.collect::<String>();
        // Dot below (class 220) goes before dot above (230); equal classes keep their order.
        assert_eq!(nfd("\u{1E0B}\u{323}"), "d\u{323}\u{307}");
        assert_eq!(nfd("a\u{301}\u{316}\u{300}b\u{308}"), "a\u{316}\u{301}\u{300}b\u{308}");
        assert_eq!(nfd("\u{301}\u{316}"), "\u{316}\u{301}");
        assert_eq!(nfd("각 Å"), "\u{1100}\u{1161}\u{11A8} A\u{30A}");
        // Compatibility forms are left alone.
        assert_eq!(nfd("ﬁ①"), "ﬁ①");
    }

    #[test]
    fn cleans_controls_and_whitespace() {
        let t = small();
        let expected = ids(&t, &["[CLS]", "hello", "world", "[SEP]"]);
        assert_eq!(t.encode("hel\u{200B}lo\u{0}\u{FFFD}\u{7}\tworld", 256), expected);
        assert_eq!(t.encode("hello\u{A0}world\r\n", 256), expected);
    }

    #[test]
    fn currency_signs_stay_in_the_word() {
        let t = small();
        assert_eq!(t.encode("€50", 256), ids(&t, &["[CLS]", "€", "##50", "[SEP]"]));
    }

    #[test]
    fn special_tokens_in_the_text_keep_their_ids() {
        let t = small();
        assert_eq!(
            t.encode("hello[MASK]world [SEP][", 256),
            ids(&t, &["[CLS]", "hello", "[MASK]", "world", "[SEP]", "[UNK]", "[SEP]"])
        );
    }

    #[test]
    fn special_tokens_are_found_by_their_bracket() {
        // `next_special` relies on this to find the leftmost-longest match.
        for (i, a) in SPECIAL_TOKENS.iter().enumerate() {
            assert!(a.starts_with('['), "{a}");
            for b in SPECIAL_TOKENS.iter().skip(i + 1) {
                assert!(!a.starts_with(b) && !b.starts_with(a), "{a} {b}");
            }
        }
    }

    #[test]
    fn long_words_are_unk() {
        let t = small();
        let exactly = "a".repeat(MAX_INPUT_CHARS_PER_WORD);
        let mut expected = vec![id(&t, "[CLS]"), id(&t, "a")];
        expected.extend(std::iter::repeat_n(id(&t, "##a"), MAX_INPUT_CHARS_PER_WORD - 1));
        expected.push(id(&t, "[SEP]"));
        assert_eq!(t.encode(&exactly, 256), expected);
        let over = "a".repeat(MAX_INPUT_CHARS_PER_WORD + 1);
        assert_eq!(t.encode(&over, 256), ids(&t, &["[CLS]", "[UNK]", "[SEP]"]));
    }

    #[test]
    fn truncates_counting_the_special_tokens() {
        let t = small();
        let text = "unaffable hello world";
        assert_eq!(t.encode(text, 4), ids(&t, &["[CLS]", "un", "##aff", "[SEP]"]));
        assert_eq!(t.encode(text, 2), ids(&t, &["[CLS]", "[SEP]"]));
        assert_eq!(t.encode(text, 0), ids(&t, &["[CLS]", "[SEP]"]));
        assert_eq!(t.encode("[MASK] hello", 3), ids(&t, &["[CLS]", "[MASK]", "[SEP]"]));
        assert_eq!(t.encode("", 256), ids(&t, &["[CLS]", "[SEP]"]));
        let long = "hello ".repeat(10_000);
        assert_eq!(t.encode(&long, 256).len(), 256);
    }

    #[test]
    fn reports_vocab_facts() {
        let t = small();
        assert_eq!(t.vocab_size(), SMALL.lines().count());
        assert_eq!(t.pad_id(), 0);
        assert!(format!("{t:?}").contains("vocab_size"));
    }

    #[test]
    fn rejects_bad_vocabularies() {
        let err = |vocab: &str| Tokenizer::from_vocab(vocab).unwrap_err();
        assert!(err("").contains("empty"), "{}", err(""));
        for missing in ["[CLS]", "[SEP]", "[UNK]", "[PAD]"] {
            let vocab = SMALL.replace(&format!("{missing}\n"), "x\n");
            assert!(err(&vocab).contains(missing), "{}", err(&vocab));
        }
        let twice = format!("{SMALL}hello\n");
        assert_eq!(err(&twice), "vocabulary has token \"hello\" twice, on lines 9 and 23");
    }

    #[test]
    fn reads_lines_as_tokenizers_does() {
        let t = Tokenizer::from_vocab("[PAD]\r\n[UNK] \n[CLS]\n[SEP]").unwrap();
        assert_eq!(t.vocab_size(), 4);
        assert_eq!(t.encode("x", 256), vec![2, 1, 3]);
    }

    /// Test data from `scripts/fetch-minilm.sh`: the model directory and a fixture's sentences.
    fn model_dir() -> std::path::PathBuf {
        std::env::var_os("WASMGRID_MINILM_DIR")
            .map_or_else(|| "/var/tmp/wasmgrid-models/all-minilm-l6-v2".into(), Into::into)
    }

    fn real() -> Tokenizer {
        let path = model_dir().join("vocab.txt");
        let vocab = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("cannot read {}: {e}; run scripts/fetch-minilm.sh (or set WASMGRID_MINILM_DIR)", path.display())
        });
        Tokenizer::from_vocab(&vocab).unwrap()
    }

    /// A committed fixture; `remedy` says how to make it again.
    fn fixture(name: &str, remedy: &str) -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}; {remedy}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    fn as_ids(value: &serde_json::Value) -> Vec<u32> {
        let ids = value.as_array().unwrap();
        ids.iter().map(|id| u32::try_from(id.as_u64().unwrap()).unwrap()).collect()
    }

    #[test]
    fn matches_the_reference_fixture() {
        let t = real();
        let reference = fixture("reference.json", "run scripts/fetch-minilm.sh");
        let max_len = reference["max_seq_length"].as_u64().unwrap() as usize;
        assert_eq!(max_len, 256);
        let sentences = reference["sentences"].as_array().unwrap();
        assert!(!sentences.is_empty());
        for sentence in sentences {
            let text = sentence["text"].as_str().unwrap();
            assert_eq!(t.encode(text, max_len), as_ids(&sentence["ids"]), "text {text:?}");
        }
    }

    #[test]
    fn matches_tokenizers_on_hard_cases() {
        let t = real();
        let cases = fixture(
            "tokenizer_cases.json",
            "run scripts/fetch-minilm.sh, then samples/minilm/fixtures/tokenizer_cases.py",
        );
        let cases = cases["cases"].as_array().unwrap();
        assert!(cases.len() > 50);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let max_len = case["max_len"].as_u64().unwrap() as usize;
            let name = case["name"].as_str().unwrap();
            assert_eq!(t.encode(text, max_len), as_ids(&case["ids"]), "case {name}: {text:?}");
        }
    }
}
