//! "a, b, c … and 12 more": long lists in messages, cut to what a person reads.

use std::fmt::Display;

/// The first `max` items joined by `sep`, then "… and N more" when some were left out.
pub fn first_n<T: Display>(items: &[T], max: usize, sep: &str) -> String {
    let mut s = items
        .iter()
        .take(max)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(sep);
    if items.len() > max {
        if !s.is_empty() {
            s.push_str(if sep.contains('\n') { sep } else { " " });
        }
        s.push_str(&format!("… and {} more", items.len() - max));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::first_n;

    #[test]
    fn cuts_long_lists() {
        assert_eq!(first_n(&["a", "b"], 3, ", "), "a, b");
        assert_eq!(first_n(&["a", "b", "c", "d"], 2, ", "), "a, b … and 2 more");
        assert_eq!(first_n(&[1, 2, 3], 1, "\n  "), "1\n  … and 2 more");
        assert_eq!(first_n::<u8>(&[], 3, ", "), "");
    }
}
