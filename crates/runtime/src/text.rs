//! Text from targets and callers shown to people: what must never reach a
//! terminal, a report or a spreadsheet as it is.

/// Unicode's bidirectional formatting characters (the marks U+061C,
/// U+200E, U+200F, the embeddings and overrides U+202A–U+202E, the
/// isolates U+2066–U+2069): U+202E would show `exe.gpj` as `jpg.exe` and
/// reorder the rest of its line. The CLI, the evidence report and its CSV
/// drop them.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::is_bidi_control;

    #[test]
    fn the_bidi_controls_and_nothing_else() {
        let controls = ['\u{061c}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}'];
        assert!(controls.into_iter().all(is_bidi_control));
        assert!(!['a', 'é', '\u{200d}', '\u{2029}', '\u{206a}', 'ש'].into_iter().any(is_bidi_control));
    }
}
