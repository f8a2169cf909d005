//! Text to index terms: identifier splitting (camelCase, snake_case, kebab-case, digits),
//! lower-casing, English stop words and Snowball stemming, and CJK runs as character
//! unigrams and bigrams (no dictionary needed, works for Chinese, Japanese and Korean).

use rust_stemmers::{Algorithm, Stemmer};
use std::sync::LazyLock;

static STEMMER: LazyLock<Stemmer> = LazyLock::new(|| Stemmer::create(Algorithm::English));

/// Words that carry no meaning for tool choice: NLTK's English stop words plus the phrasing
/// requests share ("please", "help", "show", "information").
pub const STOP_WORDS: &[&str] = &[
    "a",
    "able",
    "about",
    "above",
    "after",
    "again",
    "against",
    "ain",
    "all",
    "also",
    "am",
    "an",
    "and",
    "any",
    "anything",
    "are",
    "aren",
    "as",
    "assist",
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
    "couldn",
    "d",
    "did",
    "didn",
    "do",
    "does",
    "doesn",
    "doing",
    "don",
    "down",
    "during",
    "each",
    "few",
    "find",
    "for",
    "from",
    "further",
    "get",
    "give",
    "had",
    "hadn",
    "has",
    "hasn",
    "have",
    "haven",
    "having",
    "he",
    "hello",
    "help",
    "her",
    "here",
    "hers",
    "herself",
    "hi",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "info",
    "information",
    "into",
    "is",
    "isn",
    "it",
    "its",
    "itself",
    "just",
    "kindly",
    "know",
    "let",
    "like",
    "ll",
    "look",
    "looking",
    "m",
    "ma",
    "make",
    "may",
    "me",
    "might",
    "mightn",
    "more",
    "most",
    "mustn",
    "my",
    "myself",
    "need",
    "needn",
    "no",
    "nor",
    "not",
    "now",
    "o",
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
    "particular",
    "please",
    "provide",
    "re",
    "s",
    "same",
    "shan",
    "she",
    "should",
    "shouldn",
    "show",
    "so",
    "some",
    "something",
    "specific",
    "specifically",
    "such",
    "sure",
    "t",
    "tell",
    "than",
    "thank",
    "thanks",
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
    "thing",
    "things",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "use",
    "using",
    "ve",
    "very",
    "want",
    "was",
    "wasn",
    "way",
    "we",
    "were",
    "weren",
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
    "won",
    "would",
    "wouldn",
    "y",
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

/// Appends the index terms of `text` to `out`: CJK runs as characters and bigrams; other
/// alphanumeric runs split into words (see [`split_run`]), each lower-cased, stop words
/// dropped, the rest stemmed; a run that split also adds itself whole (`readFile` → `read`,
/// `file`, `readfil`).
pub fn terms(text: &str, out: &mut Vec<String>) {
    let mut run = String::new();
    let mut cjk = String::new();
    for c in text.chars() {
        if is_cjk(c) {
            flush_run(&mut run, out);
            cjk.push(c);
        } else if c.is_alphanumeric() {
            flush_cjk(&mut cjk, out);
            run.push(c);
        } else {
            flush_run(&mut run, out);
            flush_cjk(&mut cjk, out);
        }
    }
    flush_run(&mut run, out);
    flush_cjk(&mut cjk, out);
}

/// Cuts an alphanumeric run into words: between a digit and a non-digit, lower → Upper,
/// and before the last capital of a capital run followed by a lowercase letter
/// (`HTMLParser` → `HTML`, `Parser`), except for a plural's final `s` (`PDFs`).
pub fn split_run(run: &[char]) -> Vec<std::ops::Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let n = run.len();
    for i in 1..n {
        let (a, b) = (run[i - 1], run[i]);
        let cut = if a.is_uppercase() && b.is_uppercase() && i + 1 < n && run[i + 1].is_lowercase()
        {
            !(run[i + 1] == 's' && i + 2 == n)
        } else {
            a.is_ascii_digit() != b.is_ascii_digit() || (a.is_lowercase() && b.is_uppercase())
        };
        if cut {
            parts.push(start..i);
            start = i;
        }
    }
    parts.push(start..n);
    parts
}

/// The terms of `text` as a new vector.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    terms(text, &mut out);
    out
}

fn flush_run(run: &mut String, out: &mut Vec<String>) {
    if run.is_empty() {
        return;
    }
    let chars: Vec<char> = run.chars().collect();
    let parts = split_run(&chars);
    let mut word = |w: String| {
        if !is_stop(&w) {
            out.push(STEMMER.stem(&w).into_owned());
        }
    };
    if parts.len() > 1 {
        for p in &parts {
            word(
                chars[p.clone()]
                    .iter()
                    .flat_map(|c| c.to_lowercase())
                    .collect(),
            );
        }
    }
    word(run.to_lowercase());
    run.clear();
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
        let terms = tokenize("read_textFile list-directories v2Search");
        let want = [
            "read",
            "text",
            "file",
            "textfil",
            "list",
            "directori",
            "v",
            "2",
            "search",
            "v2search",
        ];
        assert_eq!(terms, want);
        assert_eq!(
            tokenize("Please generate the reports"),
            ["generat", "report"]
        );
        assert_eq!(
            tokenize("HTMLParser PDFs"),
            ["html", "parser", "htmlparser", "pdfs"]
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
