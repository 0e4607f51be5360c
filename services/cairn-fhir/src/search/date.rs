//! FHIR dates as ranges, and the R4 prefix rules on them.
//!
//! FHIR never compares date points: a value stands for every instant its precision leaves open
//! (`2026-03` is all of March), and the prefixes (R4 3.1.1.4.1) are defined as relations between
//! the search range and the target range. Keeping both sides as half-open `[low, high)` ranges makes
//! every prefix a one-line comparison and makes precision edge cases fall out naturally.
//!
//! The parser is hand-written rather than chrono's RFC 3339 parser because FHIR allows partial
//! dates (`2026`, `2026-03`), minute-precision search values and arbitrary fraction digits, and
//! because the precision itself carries meaning (it sets the width of the range).

use super::{DateRange, Prefix};
use chrono::{
    DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Timelike, Utc,
};

/// Stands for the missing start of a Period: the target extends indefinitely into the past.
pub(super) const NEG_INF: DateTime<Utc> = DateTime::<Utc>::MIN_UTC;
/// Stands for the missing end of a Period: an ongoing period extends indefinitely into the future.
pub(super) const POS_INF: DateTime<Utc> = DateTime::<Utc>::MAX_UTC;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    Year,
    Month,
    Day,
    Minute,
    Second,
    /// Number of fraction digits, 1..=9.
    Fraction(u32),
}

struct Parsed {
    local: NaiveDateTime,
    precision: Precision,
    offset: Option<FixedOffset>,
}

/// The value of a run of ASCII digits; `None` for anything else, so that signs, spaces and
/// non-ASCII digits are rejected rather than half-accepted.
fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 9 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

fn parse(text: &str) -> Option<Parsed> {
    // Work on bytes so that non-ASCII input can never split a char and panic.
    let b = text.as_bytes();
    let year = i32::try_from(digits(b.get(0..4)?)?).ok()?;
    if year == 0 {
        return None; // FHIR years start at 0001
    }
    let at =
        |date: NaiveDate, precision| Some(Parsed { local: date.and_time(NaiveTime::MIN), precision, offset: None });
    if b.len() == 4 {
        return at(NaiveDate::from_ymd_opt(year, 1, 1)?, Precision::Year);
    }
    if b[4] != b'-' {
        return None;
    }
    let month = digits(b.get(5..7)?)?;
    if b.len() == 7 {
        return at(NaiveDate::from_ymd_opt(year, month, 1)?, Precision::Month);
    }
    if b[7] != b'-' {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(year, month, digits(b.get(8..10)?)?)?;
    if b.len() == 10 {
        return at(date, Precision::Day);
    }
    if b[10] != b'T' || b.get(13) != Some(&b':') {
        return None;
    }
    let hour = digits(b.get(11..13)?)?;
    let minute = digits(b.get(14..16)?)?;
    let (mut second, mut nanos, mut precision, mut i) = (0, 0, Precision::Minute, 16);
    if b.get(16) == Some(&b':') {
        second = digits(b.get(17..19)?)?;
        precision = Precision::Second;
        i = 19;
        if b.get(19) == Some(&b'.') {
            let end = 20 + b[20..].iter().take_while(|c| c.is_ascii_digit()).count();
            let n = u32::try_from(end - 20).ok()?;
            if !(1..=9).contains(&n) {
                return None;
            }
            nanos = digits(&b[20..end])? * 10u32.pow(9 - n);
            precision = Precision::Fraction(n);
            i = end;
        }
    }
    // Leap seconds (`:60`) are refused: chrono cannot place them on a timeline we can compare.
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let offset = match &b[i..] {
        [] => None,
        [b'Z'] => Some(FixedOffset::east_opt(0)?),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (h, m) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            // The FHIR regex allows -13:59..+13:59 and exactly ±14:00.
            if m > 59 || h > 14 || (h == 14 && m != 0) {
                return None;
            }
            let secs = i32::try_from(h * 3600 + m * 60).ok()?;
            Some(FixedOffset::east_opt(if *sign == b'-' { -secs } else { secs })?)
        }
        _ => return None,
    };
    let local = date.and_time(NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?);
    Some(Parsed { local, precision, offset })
}

fn end_of(p: &Parsed) -> Option<NaiveDateTime> {
    let l = p.local;
    match p.precision {
        Precision::Year => Some(NaiveDate::from_ymd_opt(l.year() + 1, 1, 1)?.and_time(NaiveTime::MIN)),
        Precision::Month => {
            let (y, m) = if l.month() == 12 { (l.year() + 1, 1) } else { (l.year(), l.month() + 1) };
            Some(NaiveDate::from_ymd_opt(y, m, 1)?.and_time(NaiveTime::MIN))
        }
        Precision::Day => l.checked_add_signed(TimeDelta::days(1)),
        Precision::Minute => l.checked_add_signed(TimeDelta::minutes(1)),
        Precision::Second => l.checked_add_signed(TimeDelta::seconds(1)),
        Precision::Fraction(n) => l.checked_add_signed(TimeDelta::nanoseconds(10i64.pow(9 - n))),
    }
}

/// The range of a FHIR date/dateTime/instant string, by its precision: "2026" -> [2026-01-01,
/// 2027-01-01), "2026-03-04T10:00" -> one minute, "…:05.123Z" -> one millisecond. Values without a
/// zone are taken as UTC (FHIR says "server local time", and Cairn's servers run in UTC).
/// Returns None if malformed, including impossible dates (`2026-02-30`) and leap seconds.
pub fn date_range(text: &str) -> Option<DateRange> {
    let p = parse(text)?;
    let shift = TimeDelta::seconds(i64::from(p.offset.map_or(0, |o| o.local_minus_utc())));
    let low = p.local.and_utc().checked_sub_signed(shift)?;
    let high = end_of(&p)?.and_utc().checked_sub_signed(shift)?;
    Some(DateRange { low, high })
}

/// A FHIR `instant` (seconds and a zone are mandatory), keeping the client's offset; used for
/// `_asOf`, where a partial date would be ambiguous about which version is wanted.
pub(super) fn parse_instant(text: &str) -> Option<DateTime<FixedOffset>> {
    let p = parse(text)?;
    match (p.precision, p.offset) {
        (Precision::Second | Precision::Fraction(_), Some(offset)) => offset.from_local_datetime(&p.local).single(),
        _ => None,
    }
}

/// How far `ap` widens the search range on each side: 10% of the gap between now and the search
/// range (the figure the R4 spec suggests), but never less than one day. The floor exists because
/// "approximately today" must still mean something when the gap is zero, and a day is the
/// natural granularity of the clinical questions asked with `ap` ("around the 4th of March").
pub(super) fn ap_margin(search: &DateRange, now: DateTime<Utc>) -> TimeDelta {
    let gap = if now < search.low {
        search.low - now
    } else if now >= search.high {
        now - search.high
    } else {
        TimeDelta::zero()
    };
    (gap / 10).max(TimeDelta::days(1))
}

/// The R4 prefix relation between a search range and a target range.
pub(super) fn compare(prefix: Prefix, search: &DateRange, target: &DateRange, now: DateTime<Utc>) -> bool {
    let contains = search.low <= target.low && target.high <= search.high;
    let after = target.high > search.high; // some part of the target lies after the search range
    let before = target.low < search.low; // some part of the target lies before it
    match prefix {
        Prefix::Eq => contains,
        Prefix::Ne => !contains,
        Prefix::Gt => after,
        Prefix::Lt => before,
        Prefix::Ge => after || contains,
        Prefix::Le => before || contains,
        Prefix::Sa => target.low >= search.high,
        Prefix::Eb => target.high <= search.low,
        Prefix::Ap => {
            let margin = ap_margin(search, now);
            let low = search.low.checked_sub_signed(margin).unwrap_or(NEG_INF);
            let high = search.high.checked_add_signed(margin).unwrap_or(POS_INF);
            target.low < high && target.high > low
        }
    }
}

/// The shortest search text whose range is exactly `range`, in UTC, so that a canonical query
/// string re-parses to the same range. Ranges that no search text produces (hand-built ones) fall
/// back to a nanosecond-precision start, which is the best a single value can say.
pub(super) fn format_range(range: &DateRange) -> String {
    let (low, high) = (range.low.naive_utc(), range.high.naive_utc());
    let ymd = format!("{:04}-{:02}-{:02}", low.year(), low.month(), low.day());
    let hm = format!("{ymd}T{:02}:{:02}", low.hour(), low.minute());
    let hms = format!("{hm}:{:02}", low.second());
    let width = high - low;
    let midnight = low.time() == NaiveTime::MIN;
    let is = |text: &str| date_range(text).is_some_and(|r| r == *range);
    if midnight && low.month() == 1 && low.day() == 1 && is(&format!("{:04}", low.year())) {
        return format!("{:04}", low.year());
    }
    if midnight && low.day() == 1 && is(&ymd[..7]) {
        return ymd[..7].to_string();
    }
    if midnight && width == TimeDelta::days(1) {
        return ymd;
    }
    if low.second() == 0 && low.nanosecond() == 0 && width == TimeDelta::minutes(1) {
        return format!("{hm}Z");
    }
    if low.nanosecond() == 0 && width == TimeDelta::seconds(1) {
        return format!("{hms}Z");
    }
    for n in 1..=9u32 {
        let unit = 10u32.pow(9 - n);
        if low.nanosecond() % unit == 0 && width == TimeDelta::nanoseconds(i64::from(unit)) {
            return format!("{hms}.{:0width$}Z", low.nanosecond() / unit, width = n as usize);
        }
    }
    format!("{hms}.{:09}Z", low.nanosecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("test instant").with_timezone(&Utc)
    }

    fn range(low: &str, high: &str) -> DateRange {
        DateRange { low: utc(low), high: utc(high) }
    }

    fn r(text: &str) -> DateRange {
        date_range(text).unwrap_or_else(|| panic!("{text} should parse"))
    }

    #[test]
    fn year_precision_covers_the_whole_year() {
        assert_eq!(r("2026"), range("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"));
    }

    #[test]
    fn month_precision_covers_the_month_including_december_rollover_and_leap_february() {
        assert_eq!(r("2026-03"), range("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"));
        assert_eq!(r("2026-12"), range("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"));
        assert_eq!(r("2028-02"), range("2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"));
    }

    #[test]
    fn day_precision_covers_one_utc_day() {
        assert_eq!(r("2026-03-04"), range("2026-03-04T00:00:00Z", "2026-03-05T00:00:00Z"));
        assert_eq!(r("2024-02-29"), range("2024-02-29T00:00:00Z", "2024-03-01T00:00:00Z"));
        assert_eq!(r("2026-12-31"), range("2026-12-31T00:00:00Z", "2027-01-01T00:00:00Z"));
    }

    #[test]
    fn minute_precision_without_zone_is_utc() {
        assert_eq!(r("2026-03-04T10:00"), range("2026-03-04T10:00:00Z", "2026-03-04T10:01:00Z"));
        assert_eq!(r("2026-03-04T23:59"), range("2026-03-04T23:59:00Z", "2026-03-05T00:00:00Z"));
    }

    #[test]
    fn second_precision_is_one_second_wide() {
        assert_eq!(r("2026-03-04T10:00:05"), range("2026-03-04T10:00:05Z", "2026-03-04T10:00:06Z"));
        assert_eq!(r("2026-03-04T10:00:05Z"), range("2026-03-04T10:00:05Z", "2026-03-04T10:00:06Z"));
    }

    #[test]
    fn fraction_digits_set_the_width() {
        assert_eq!(r("2026-03-04T10:00:05.1Z"), range("2026-03-04T10:00:05.1Z", "2026-03-04T10:00:05.2Z"));
        assert_eq!(r("2026-03-04T10:00:05.123Z"), range("2026-03-04T10:00:05.123Z", "2026-03-04T10:00:05.124Z"));
        assert_eq!(
            r("2026-03-04T10:00:05.123456Z"),
            range("2026-03-04T10:00:05.123456Z", "2026-03-04T10:00:05.123457Z")
        );
        let ns = r("2026-03-04T10:00:05.999999999Z");
        assert_eq!(ns.high - ns.low, TimeDelta::nanoseconds(1));
        assert_eq!(ns.high, utc("2026-03-04T10:00:06Z"));
    }

    #[test]
    fn zones_shift_to_utc() {
        assert_eq!(r("2026-03-04T07:30:00+01:00"), range("2026-03-04T06:30:00Z", "2026-03-04T06:30:01Z"));
        assert_eq!(r("2026-03-04T23:30-05:00"), range("2026-03-05T04:30:00Z", "2026-03-05T04:31:00Z"));
        assert_eq!(r("2026-03-04T00:00:00+14:00"), range("2026-03-03T10:00:00Z", "2026-03-03T10:00:01Z"));
        assert_eq!(r("2026-03-04T10:00:00.5+05:30").low, utc("2026-03-04T04:30:00.5Z"));
    }

    #[test]
    fn malformed_dates_are_refused() {
        for bad in [
            "",
            "26",
            "202",
            "20261",
            "2026-1",
            "2026-13",
            "2026-00",
            "2026-13-01",
            "2026-02-30",
            "2026-02-29",
            "2026-03-04T",
            "2026-03-04T10",
            "2026-03-04T24:00",
            "2026-03-04T10:60",
            "2026-03-04T10:00:60",
            "2026-03-04T10:00:00.",
            "2026-03-04T10:00:00.1234567890Z",
            "2026-03-04 10:00",
            "2026-03-04t10:00",
            "2026-03-04Z",
            "2026Z",
            "2026-03-04T10:00:00+1:00",
            "2026-03-04T10:00:00+14:30",
            "2026-03-04T10:00:00+15:00",
            "2026-03-04T10:00:00+01:60",
            "2026-03-04T10:00:00z",
            "0000",
            "+2026",
            "2026/03/04",
            "2026-03-04T10:00:00ZZ",
            "２０２６",
            "2026-03-04T10:00:00+01:00 ",
        ] {
            assert_eq!(date_range(bad), None, "{bad:?} must be refused");
        }
    }

    #[test]
    fn instants_need_seconds_and_a_zone() {
        let asof = parse_instant("2026-03-04T10:00:00+02:00").expect("instant");
        assert_eq!(asof.offset().local_minus_utc(), 7200);
        assert_eq!(asof.with_timezone(&Utc), utc("2026-03-04T08:00:00Z"));
        assert_eq!(parse_instant("2026-03-04T10:00:00.25Z").map(|d| d.nanosecond()), Some(250_000_000));
        assert_eq!(parse_instant("2026-03-04T10:00:00"), None);
        assert_eq!(parse_instant("2026-03-04T10:00Z"), None);
        assert_eq!(parse_instant("2026-03-04"), None);
    }

    /// The target of each case is a single second, the shape of a CGM reading's effectiveDateTime.
    fn cmp(prefix: Prefix, search: &str, target: &str) -> bool {
        compare(prefix, &r(search), &r(target), utc("2026-03-10T00:00:00Z"))
    }

    #[test]
    fn eq_requires_the_search_range_to_contain_the_target() {
        assert!(cmp(Prefix::Eq, "2026", "2026-12-31T23:59:59Z"));
        assert!(!cmp(Prefix::Eq, "2026", "2027-01-01T00:00:00Z"));
        assert!(cmp(Prefix::Eq, "2026-03-04", "2026-03-04T00:00:00Z"));
        assert!(!cmp(Prefix::Eq, "2026-03-04", "2026-03-03T23:59:59Z"));
        // A wider target is not contained even though it overlaps.
        assert!(!cmp(Prefix::Eq, "2026-03-04", "2026-03"));
        assert!(cmp(Prefix::Eq, "2026-03", "2026-03-04"));
        // Millisecond search against a second-precision target: the target is wider, so no match.
        assert!(!cmp(Prefix::Eq, "2026-03-04T10:00:00.000Z", "2026-03-04T10:00:00Z"));
        assert!(cmp(Prefix::Eq, "2026-03-04T10:00:00Z", "2026-03-04T10:00:00.999Z"));
        // Zones: 07:30+01:00 is 06:30Z, inside the UTC minute 06:30.
        assert!(cmp(Prefix::Eq, "2026-03-04T06:30", "2026-03-04T07:30:15+01:00"));
        assert!(!cmp(Prefix::Eq, "2026-03-04T07:30", "2026-03-04T07:30:15+01:00"));
    }

    #[test]
    fn ne_is_the_negation_of_eq() {
        assert!(!cmp(Prefix::Ne, "2026-03-04", "2026-03-04T12:00:00Z"));
        assert!(cmp(Prefix::Ne, "2026-03-04", "2026-03-05T12:00:00Z"));
        assert!(cmp(Prefix::Ne, "2026-03-04", "2026-03"));
    }

    #[test]
    fn gt_and_lt_look_beyond_the_search_range_ends() {
        assert!(cmp(Prefix::Gt, "2026-03-04", "2026-03-05T00:00:00Z"));
        assert!(!cmp(Prefix::Gt, "2026-03-04", "2026-03-04T23:59:59Z"));
        assert!(!cmp(Prefix::Gt, "2026-03-04", "2026-03-04T23:59:59.999Z"));
        assert!(cmp(Prefix::Gt, "2026-03-04", "2026-03")); // March extends past the 4th
        assert!(cmp(Prefix::Lt, "2026-03-04", "2026-03-03T23:59:59Z"));
        assert!(!cmp(Prefix::Lt, "2026-03-04", "2026-03-04T00:00:00Z"));
        assert!(cmp(Prefix::Lt, "2026-03-04", "2026-03")); // and starts before it
        assert!(cmp(Prefix::Gt, "2026", "2027-01-01T00:00:00Z"));
        assert!(!cmp(Prefix::Gt, "2026", "2026-12-31T23:59:59Z"));
        assert!(cmp(Prefix::Lt, "2026-03-04T10:00", "2026-03-04T09:59:59Z"));
        assert!(!cmp(Prefix::Lt, "2026-03-04T10:00", "2026-03-04T10:00:00Z"));
        assert!(cmp(Prefix::Gt, "2026-03-04T10:00:00Z", "2026-03-04T10:00:01Z"));
        assert!(!cmp(Prefix::Gt, "2026-03-04T10:00:00Z", "2026-03-04T10:00:00.999Z"));
        assert!(cmp(Prefix::Gt, "2026-03-04T10:00:00.123Z", "2026-03-04T10:00:00.124Z"));
        assert!(!cmp(Prefix::Gt, "2026-03-04T10:00:00.123Z", "2026-03-04T10:00:00.123Z"));
    }

    #[test]
    fn ge_and_le_include_the_search_range() {
        assert!(cmp(Prefix::Ge, "2026-03-04", "2026-03-04T00:00:00Z"));
        assert!(cmp(Prefix::Ge, "2026-03-04", "2026-03-06T00:00:00Z"));
        assert!(!cmp(Prefix::Ge, "2026-03-04", "2026-03-03T23:59:59Z"));
        assert!(cmp(Prefix::Le, "2026-03-04", "2026-03-04T23:59:59Z"));
        assert!(cmp(Prefix::Le, "2026-03-04", "2026-03-01T00:00:00Z"));
        assert!(!cmp(Prefix::Le, "2026-03-04", "2026-03-05T00:00:00Z"));
        // Month precision: ge2026-03 admits March 1st, not February 28th.
        assert!(cmp(Prefix::Ge, "2026-03", "2026-03-01T00:00:00Z"));
        assert!(!cmp(Prefix::Ge, "2026-03", "2026-02-28T23:59:59Z"));
        assert!(cmp(Prefix::Le, "2026-03", "2026-03-31T23:59:59Z"));
        assert!(!cmp(Prefix::Le, "2026-03", "2026-04-01T00:00:00Z"));
    }

    #[test]
    fn sa_and_eb_need_the_whole_target_outside() {
        assert!(cmp(Prefix::Sa, "2026-03-04", "2026-03-05T00:00:00Z"));
        assert!(!cmp(Prefix::Sa, "2026-03-04", "2026-03-04T23:59:59Z"));
        assert!(!cmp(Prefix::Sa, "2026-03-04", "2026-03")); // overlaps, so not "after"
        assert!(cmp(Prefix::Eb, "2026-03-04", "2026-03-03T23:59:59Z"));
        assert!(!cmp(Prefix::Eb, "2026-03-04", "2026-03-04T00:00:00Z"));
        assert!(!cmp(Prefix::Eb, "2026-03-04", "2026-03"));
        assert!(cmp(Prefix::Eb, "2026-03-04", "2026-02"));
    }

    #[test]
    fn periods_including_open_ended_ones() {
        let now = utc("2026-03-10T00:00:00Z");
        let day = r("2026-03-04");
        let ongoing = DateRange { low: utc("2026-03-01T00:00:00Z"), high: POS_INF };
        assert!(!compare(Prefix::Eq, &day, &ongoing, now));
        assert!(compare(Prefix::Gt, &day, &ongoing, now));
        assert!(compare(Prefix::Lt, &day, &ongoing, now));
        assert!(compare(Prefix::Sa, &r("2026-02"), &ongoing, now));
        assert!(!compare(Prefix::Eb, &day, &ongoing, now));
        let no_start = DateRange { low: NEG_INF, high: utc("2026-03-02T00:00:00Z") };
        assert!(compare(Prefix::Lt, &day, &no_start, now));
        assert!(!compare(Prefix::Gt, &day, &no_start, now));
        assert!(compare(Prefix::Eb, &day, &no_start, now));
        assert!(!compare(Prefix::Eq, &r("2026"), &no_start, now));
        let inside = DateRange { low: utc("2026-03-04T01:00:00Z"), high: utc("2026-03-04T02:00:00Z") };
        assert!(compare(Prefix::Eq, &day, &inside, now));
        assert!(compare(Prefix::Ge, &day, &inside, now));
        assert!(compare(Prefix::Le, &day, &inside, now));
    }

    #[test]
    fn ap_widens_by_a_tenth_of_the_distance_from_now_but_at_least_a_day() {
        let now = utc("2026-03-10T00:00:00Z");
        // Search day ends 2026-03-05, five days before now: 10% is 12h, so the one-day floor wins.
        let day = r("2026-03-04");
        assert_eq!(ap_margin(&day, now), TimeDelta::days(1));
        assert!(compare(Prefix::Ap, &day, &r("2026-03-05T23:59:59Z"), now));
        assert!(!compare(Prefix::Ap, &day, &r("2026-03-06T00:00:00Z"), now));
        assert!(compare(Prefix::Ap, &day, &r("2026-03-03T00:00:00Z"), now));
        assert!(!compare(Prefix::Ap, &day, &r("2026-03-02T23:59:59Z"), now));
        // 2016-03-10 ends ~10 years before now, so the margin is ~1 year.
        let old = r("2016-03-10");
        let margin = ap_margin(&old, now);
        assert!(margin > TimeDelta::days(364) && margin < TimeDelta::days(367), "{margin}");
        assert!(compare(Prefix::Ap, &old, &r("2015-06-01"), now));
        assert!(!compare(Prefix::Ap, &old, &r("2014-12-31"), now));
        // The search range containing now: only the floor applies.
        assert_eq!(ap_margin(&r("2026-03"), now), TimeDelta::days(1));
        // Future values widen by distance too.
        assert_eq!(ap_margin(&r("2036-03-10"), now), (r("2036-03-10").low - now) / 10);
    }

    #[test]
    fn format_range_round_trips_every_precision() {
        for text in [
            "2026",
            "2026-03",
            "2026-12",
            "2026-03-04",
            "2026-01-01",
            "2026-03-04T10:00Z",
            "2026-03-04T00:00Z",
            "2026-03-04T10:00:05Z",
            "2026-03-04T00:00:00Z",
            "2026-03-04T10:00:05.1Z",
            "2026-03-04T10:00:05.120Z",
            "2026-03-04T10:00:05.123456789Z",
            "0001-01-01",
            "9999",
        ] {
            assert_eq!(format_range(&r(text)), text);
        }
        // Zones are normalised to UTC but keep their width.
        assert_eq!(format_range(&r("2026-03-04T07:30+01:00")), "2026-03-04T06:30Z");
        // A hand-built range no single value can express degrades to its start at ns precision.
        let odd = range("2026-03-04T10:00:00Z", "2026-03-04T10:00:07Z");
        assert_eq!(format_range(&odd), "2026-03-04T10:00:00.000000000Z");
    }
}
