//! A deterministic WordPiece vocabulary trainer.
//!
//! It is the algorithm of `tokenizers`' `WordPieceTrainer` (BPE merges over the words of the
//! corpus, continuation pieces prefixed with `##`), with one difference that matters here: the
//! result depends only on the captions. `tokenizers` numbers the `##` pieces in hash-map order,
//! and its hash maps are seeded randomly per process, so two runs on the same captions give
//! different ids (and, through tie-breaking, different pieces), and so different models from the
//! same seed. Here, ties go to the pair with the smaller ids and every id is assigned in a fixed
//! order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

type Pair = (u32, u32);

/// The vocabulary, in id order: `specials`, then single characters (sorted), then their `prefix`
/// continuation forms (sorted), then merged pieces in the order they were learned, until
/// `vocab_size` entries. `Err(n)` when the characters alone need `n > vocab_size` entries.
pub(crate) fn train_vocab(
    words: &BTreeMap<String, u64>,
    specials: &[&str],
    vocab_size: usize,
    prefix: &str,
) -> Result<Vec<String>, usize> {
    let mut vocab = alphabet(words, specials, prefix);
    if vocab.len() > vocab_size {
        return Err(vocab.len());
    }
    let mut ids: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, s)| (s.clone(), i as u32)).collect();

    let mut words: Vec<(Vec<u32>, i64)> = words
        .iter()
        .map(|(w, &n)| {
            let syms = w
                .chars()
                .enumerate()
                .map(|(i, c)| ids[&if i == 0 { c.to_string() } else { format!("{prefix}{c}") }])
                .collect();
            (syms, n as i64)
        })
        .collect();
    let mut counts: HashMap<Pair, i64> = HashMap::new();
    let mut where_: HashMap<Pair, HashSet<usize>> = HashMap::new();
    for (wi, (syms, n)) in words.iter().enumerate() {
        for p in syms.windows(2) {
            *counts.entry((p[0], p[1])).or_default() += n;
            where_.entry((p[0], p[1])).or_default().insert(wi);
        }
    }
    // Max-heap on (count, smaller pair first); stale entries are re-checked when popped.
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> = counts.iter().map(|(&p, &c)| (c, Reverse(p))).collect();

    while vocab.len() < vocab_size {
        let Some((count, Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = counts.get(&pair).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(pair)));
            }
            continue;
        }
        let (a, b) = pair;
        let right = &vocab[b as usize];
        let piece = format!("{}{}", vocab[a as usize], right.strip_prefix(prefix).unwrap_or(right));
        let new = *ids.entry(piece.clone()).or_insert_with(|| {
            vocab.push(piece);
            (vocab.len() - 1) as u32
        });
        let touched = merge_everywhere(&mut words, &mut counts, &mut where_, pair, new);
        for p in touched {
            let c = counts[&p];
            if c > 0 {
                heap.push((c, Reverse(p)));
            }
        }
    }
    Ok(vocab)
}

/// The specials, then every character of the words in its plain form (sorted), then in its
/// `prefix` continuation form (sorted).
fn alphabet(words: &BTreeMap<String, u64>, specials: &[&str], prefix: &str) -> Vec<String> {
    let mut vocab: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    // Every character of a multi-character word gets both forms, so an unseen word made of known
    // characters never becomes [UNK]. Single-character words (each CJK character, punctuation)
    // never continue a word and need only the plain form.
    let mut plain = BTreeSet::new();
    let mut continuing = BTreeSet::new();
    for w in words.keys() {
        plain.extend(w.chars());
        if w.chars().nth(1).is_some() {
            continuing.extend(w.chars());
        }
    }
    vocab.extend(plain.iter().map(|c| c.to_string()));
    vocab.extend(continuing.iter().map(|c| format!("{prefix}{c}")));
    vocab
}

/// Merges `pair` into the symbol `new` in every word holding it (in word order, so the result is
/// deterministic), keeping `counts` and `where_` up to date: the pairs whose counts grew, to be
/// pushed on the heap again.
fn merge_everywhere(
    words: &mut [(Vec<u32>, i64)],
    counts: &mut HashMap<Pair, i64>,
    where_: &mut HashMap<Pair, HashSet<usize>>,
    pair: Pair,
    new: u32,
) -> BTreeSet<Pair> {
    let mut touched = BTreeSet::new();
    let mut affected: Vec<usize> = where_.remove(&pair).unwrap_or_default().into_iter().collect();
    affected.sort_unstable();
    for wi in affected {
        let (syms, n) = &mut words[wi];
        if !syms.windows(2).any(|p| (p[0], p[1]) == pair) {
            continue;
        }
        for p in syms.windows(2) {
            *counts.entry((p[0], p[1])).or_default() -= *n;
        }
        let merged = merged(syms, pair, new);
        for p in merged.windows(2) {
            *counts.entry((p[0], p[1])).or_default() += *n;
            where_.entry((p[0], p[1])).or_default().insert(wi);
            touched.insert((p[0], p[1]));
        }
        *syms = merged;
    }
    touched
}

/// `syms` with each occurrence of `pair`, left to right, replaced by `new`.
fn merged(syms: &[u32], pair: Pair, new: u32) -> Vec<u32> {
    let mut merged = Vec::with_capacity(syms.len());
    let mut i = 0;
    while i < syms.len() {
        if i + 1 < syms.len() && (syms[i], syms[i + 1]) == pair {
            merged.push(new);
            i += 2;
        } else {
            merged.push(syms[i]);
            i += 1;
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
        list.iter().map(|(w, n)| (w.to_string(), *n)).collect()
    }

    #[test]
    fn merges_frequent_pairs_into_whole_words() {
        let v = train_vocab(&words(&[("cat", 5), ("cap", 2), ("人", 1)]), &["[PAD]"], 100, "##").unwrap();
        assert_eq!(&v[..4], ["[PAD]", "a", "c", "p"]);
        assert!(v.contains(&"##a".to_string()) && v.contains(&"人".to_string()));
        assert!(
            !v.contains(&"##人".to_string()),
            "a single-character word never continues a word"
        );
        assert!(
            v.contains(&"cat".to_string()) && v.contains(&"cap".to_string()),
            "{v:?}"
        );
        let ca = v.iter().position(|s| s == "ca").unwrap();
        let cat = v.iter().position(|s| s == "cat").unwrap();
        assert!(ca < cat, "pieces are numbered in the order they are learned");
    }

    #[test]
    fn stops_at_vocab_size_and_reports_when_the_alphabet_does_not_fit() {
        let w = words(&[("abcdef", 3), ("fedcba", 1)]);
        assert_eq!(train_vocab(&w, &["[PAD]"], 15, "##").unwrap().len(), 15);
        assert_eq!(train_vocab(&w, &["[PAD]"], 5, "##"), Err(13));
    }

    #[test]
    fn repeated_pairs_inside_a_word() {
        let v = train_vocab(&words(&[("aaaa", 1)]), &[], 100, "##").unwrap();
        assert!(v.contains(&"aaaa".to_string()), "{v:?}");
    }
}
