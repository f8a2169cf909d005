//! Text to index terms: identifier splitting (camelCase, snake_case, kebab-case, digits),
//! lower-casing, English stop words and Snowball stemming, and CJK runs as character
//! unigrams and bigrams (no dictionary needed, works for Chinese, Japanese and Korean).

use rust_stemmers::{Algorithm, Stemmer};
use std::sync::LazyLock;

static STEMMER: LazyLock<Stemmer> = LazyLock::new(|| Stemmer::create(Algorithm::English));

/// Words that carry no meaning for tool choice. General English function words plus the
/// request phrasing every prompt shares ("please", "could you", "want").
pub const STOP_WORDS: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "also",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "could",
    "did",
    "do",
    "does",
    "doing",
    "down",
    "during",
    "each",
    "either",
    "etc",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "let",
    "like",
    "may",
    "me",
    "might",
    "more",
    "most",
    "must",
    "my",
    "myself",
    "need",
    "needs",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "please",
    "same",
    "shall",
    "she",
    "should",
    "so",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "us",
    "use",
    "used",
    "using",
    "very",
    "via",
    "want",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "would",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
];

fn is_stop(word: &str) -> bool {
    STOP_WORDS.binary_search(&word).is_ok()
}

/// Han, kana and Hangul: scripts written without spaces between words.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // Hiragana, Katakana
        | 0x3400..=0x4DBF    // CJK Extension A
        | 0x4E00..=0x9FFF    // CJK Unified Ideographs
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK Compatibility Ideographs
        | 0x20000..=0x2FA1F  // CJK Extensions B–F, compatibility supplement
    )
}

/// Appends the index terms of `text` to `out`.
pub fn terms(text: &str, out: &mut Vec<String>) {
    let mut word = String::new();
    let mut cjk = String::new();
    let mut prev: Option<char> = None;
    for c in text.chars() {
        if is_cjk(c) {
            flush_word(&mut word, out);
            cjk.push(c);
            prev = Some(c);
            continue;
        }
        flush_cjk(&mut cjk, out);
        if c.is_alphanumeric() {
            // Identifier boundaries: fooBar → foo Bar, v2 → v 2.
            if let Some(p) = prev
                && !word.is_empty()
            {
                let boundary = (p.is_lowercase() && c.is_uppercase())
                    || (p.is_alphabetic() && c.is_numeric())
                    || (p.is_numeric() && c.is_alphabetic());
                if boundary {
                    flush_word(&mut word, out);
                }
            }
            word.extend(c.to_lowercase());
        } else {
            flush_word(&mut word, out);
        }
        prev = Some(c);
    }
    flush_word(&mut word, out);
    flush_cjk(&mut cjk, out);
}

/// The terms of `text` as a new vector.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    terms(text, &mut out);
    out
}

fn flush_word(word: &mut String, out: &mut Vec<String>) {
    if word.is_empty() {
        return;
    }
    if !is_stop(word) {
        let stem = STEMMER.stem(word);
        out.push(stem.into_owned());
    }
    word.clear();
}

fn flush_cjk(run: &mut String, out: &mut Vec<String>) {
    let chars: Vec<char> = run.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        out.push(c.to_string());
        if let Some(next) = chars.get(i + 1) {
            out.push(format!("{c}{next}"));
        }
    }
    run.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_words_are_sorted_for_binary_search() {
        assert!(STOP_WORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn splits_identifiers_and_stems() {
        assert_eq!(
            tokenize("read_textFile list-directories v2Search"),
            [
                "read",
                "text",
                "file",
                "list",
                "directori",
                "v",
                "2",
                "search"
            ]
        );
        assert_eq!(
            tokenize("Please generate the reports"),
            ["generat", "report"]
        );
    }

    #[test]
    fn cjk_runs_become_unigrams_and_bigrams() {
        assert_eq!(
            tokenize("必应搜索 web"),
            ["必", "必应", "应", "应搜", "搜", "搜索", "索", "web"]
        );
    }

    #[test]
    fn empty_and_symbol_text_has_no_terms() {
        assert!(tokenize("").is_empty());
        assert!(tokenize(" -- !! ?? ").is_empty());
    }
}
