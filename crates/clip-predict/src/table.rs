//! Plain-text tables that line up with CJK text (two columns per wide character).

/// Display width of a string in a terminal.
pub fn width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

fn char_width(c: char) -> usize {
    let u = c as u32;
    let wide = (0x1100..=0x115F).contains(&u)
        || (0x2E80..=0xA4CF).contains(&u)
        || (0xAC00..=0xD7A3).contains(&u)
        || (0xF900..=0xFAFF).contains(&u)
        || (0xFE30..=0xFE4F).contains(&u)
        || (0xFF00..=0xFF60).contains(&u)
        || (0xFFE0..=0xFFE6).contains(&u)
        || (0x20000..=0x3FFFD).contains(&u);
    if wide {
        2
    } else {
        1
    }
}

/// Cuts `s` to at most `max` columns (with … when cut) and pads it to exactly `max`.
pub fn fit(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut w = 0;
    let total = width(s);
    for c in s.chars() {
        let cw = char_width(c);
        if total > max && w + cw > max.saturating_sub(1) {
            out.push('…');
            w += 1;
            break;
        }
        out.push(c);
        w += cw;
    }
    out.push_str(&" ".repeat(max.saturating_sub(w)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cjk_is_two_columns() {
        assert_eq!(width("枸杞"), 4);
        assert_eq!(width("a cup"), 5);
        assert_eq!(width(&fit("銀川枸杞", 6)), 6);
        assert_eq!(width(&fit("ab", 6)), 6);
    }
}
