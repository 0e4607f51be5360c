//! Case and accent folding for FHIR `string` search.
//!
//! R4 says string search "is case- and accent-insensitive", so `name=muller` must find `Müller`.
//! Full Unicode normalisation would need a crate this service does not carry; instead, decomposed
//! combining marks are dropped and the precomposed Latin letters of Latin-1 and Latin Extended-A
//! (which cover the names Cairn's users actually have) are mapped to their base letters. Letters
//! outside those blocks are only lower-cased, which errs towards fewer matches, never wrong ones.

/// The folded form two strings are compared by.
pub(super) fn fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        match c {
            // Combining diacritical marks: what is left of an accent in decomposed text.
            '\u{0300}'..='\u{036f}' => {}
            'ß' => out.push_str("ss"),
            'æ' => out.push_str("ae"),
            'œ' => out.push_str("oe"),
            'þ' => out.push_str("th"),
            'ĳ' => out.push_str("ij"),
            _ => out.push(base_letter(c)),
        }
    }
    out
}

fn base_letter(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => 'a',
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => 'c',
        'ď' | 'đ' | 'ð' => 'd',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => 'e',
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => 'g',
        'ĥ' | 'ħ' => 'h',
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => 'i',
        'ĵ' => 'j',
        'ķ' | 'ĸ' => 'k',
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => 'l',
        'ñ' | 'ń' | 'ņ' | 'ň' | 'ŉ' | 'ŋ' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => 'o',
        'ŕ' | 'ŗ' | 'ř' => 'r',
        'ś' | 'ŝ' | 'ş' | 'š' | 'ſ' => 's',
        'ţ' | 'ť' | 'ŧ' => 't',
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => 'u',
        'ŵ' => 'w',
        'ý' | 'ÿ' | 'ŷ' => 'y',
        'ź' | 'ż' | 'ž' => 'z',
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::fold;

    #[test]
    fn folds_case_and_precomposed_accents() {
        assert_eq!(fold("Müller"), "muller");
        assert_eq!(fold("ZOË"), "zoe");
        assert_eq!(fold("Łukasz Żółć"), "lukasz zolc");
        assert_eq!(fold("Straße"), "strasse");
        assert_eq!(fold("Ærøskøbing"), "aeroskobing");
        assert_eq!(fold("Dvořák"), "dvorak");
        assert_eq!(fold("François"), "francois");
    }

    #[test]
    fn drops_decomposed_combining_marks() {
        assert_eq!(fold("Mu\u{0308}ller"), "muller");
        assert_eq!(fold("Zoe\u{0308}"), fold("Zoë"));
    }

    #[test]
    fn leaves_other_scripts_lower_cased_only() {
        assert_eq!(fold("Ἀθῆναι"), "ἀθῆναι");
        assert_eq!(fold("Иван"), "иван");
    }
}
