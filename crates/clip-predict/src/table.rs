//! Plain-text tables that line up with CJK text (two columns per wide character).
//!
//! Column widths come from the `unicode-width` crate (Unicode's East Asian Width property), not a
//! hand-made list of ranges: it knows every wide block, combining marks and zero-width characters.

use unicode_width::UnicodeWidthStr;

/// Display width of a string in a terminal.
pub fn width(s: &str) -> usize {
    s.width()
}

/// Cuts `s` to at most `max` columns (with … when cut) and pads it to exactly `max`.
pub fn fit(s: &str, max: usize) -> String {
    let mut out = if width(s) <= max {
        s.to_string()
    } else {
        // The longest prefix that leaves one column for the ellipsis. Prefixes are measured as
        // strings, not char by char, so sequences the crate treats as one (emoji with a variation
        // selector, "\r\n") count as they display.
        let room = max.saturating_sub(1);
        let end = s
            .char_indices()
            .map(|(i, c)| i + c.len_utf8())
            .take_while(|&end| width(&s[..end]) <= room)
            .last()
            .unwrap_or(0);
        format!("{}…", &s[..end])
    };
    out.push_str(&" ".repeat(max.saturating_sub(width(&out))));
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
        assert_eq!(fit("銀川枸杞", 6), "銀川… ");
        assert_eq!(width(&fit("ab", 6)), 6);
        assert_eq!(fit("abcdefgh", 6), "abcde…");
    }

    #[test]
    fn rows_with_cjk_and_ascii_line_up() {
        // The column after each cell starts at the same terminal column, whatever the script.
        let rows: Vec<String> = [
            ("人蔘", "ginseng"),
            ("ginseng root", "ascii"),
            ("高麗人参の根と葉", "日本語"),
            ("인삼", "한국어"),
        ]
        .iter()
        .map(|(a, b)| format!("{} | {} |", fit(a, 10), fit(b, 8)))
        .collect();
        let bars = |row: &str| -> Vec<usize> {
            row.char_indices()
                .filter(|&(_, c)| c == '|')
                .map(|(i, _)| width(&row[..i]))
                .collect()
        };
        for row in &rows {
            assert_eq!(bars(row), vec![11, 22], "{rows:#?}");
            assert_eq!(width(row), 23, "{row}");
        }
        // 人蔘 is four columns wide, so six spaces fill its ten-column cell.
        assert!(rows[0].starts_with(&format!("人蔘{} |", " ".repeat(6))), "{}", rows[0]);
        // Too wide for its cell: cut at a whole character, never half of a wide one.
        // 高麗人参 + … is nine columns: the next wide character would overflow, so one space pads.
        assert!(rows[2].starts_with("高麗人参…  |"), "{}", rows[2]);
    }
}
