//! Key schemes: how an account and a time bucket become a counter key, and how long it lives.
//!
//! The default shape is the reference deployment's: `<prefix>:<account>:<bucket>`, the account
//! exactly as given (no braces, no escaping), e.g. `fair_use:dg_budget:uid-42:20261129`, so that
//! readers that already `GET` those keys see what the engine writes. Everything about the shape
//! can be set to match another deployment: the separator, whether the bucket comes first, the
//! bucket label's format, a Redis Cluster hash tag around the account, escaping of the account.
//!
//! # Why the default mapping is unambiguous
//!
//! Two different (account, bucket) pairs must never name one key, or two users would share a
//! counter. With a raw account an id may itself contain the separator (`team:ops`), so the
//! account's end cannot be found by looking for a separator. It is found from the other side:
//! the bucket label is `YYYYMMDD`, always 8 characters, so a key is `prefix`, the separator, the
//! account, the separator, and exactly 8 final characters; both the account and the bucket can be
//! read back, so the mapping is one-to-one. A label of variable length (Unix seconds) is still
//! unambiguous when the separator cannot occur in it (it has a character that is not a digit or
//! `-`): the label is then what follows the last separator. [`KeyScheme::validate`] refuses the
//! combinations where neither holds, and a date label for buckets shorter than a day (two
//! buckets would share a date).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECONDS_PER_DAY: u64 = 86_400;

/// How counters are named and when they expire. See [`KeyScheme::daily_utc`] for the reference
/// deployment's scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScheme {
    prefix: String,
    separator: String,
    bucket: Bucket,
    label: BucketLabel,
    bucket_first: bool,
    hash_tag: bool,
    escape: bool,
    ttl: Ttl,
}

/// How usage is split over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// One counter per account, forever (until it expires).
    None,
    /// One counter per account per UTC day.
    UtcDay,
    /// One counter per account per period, aligned to the Unix epoch.
    Every(Duration),
}

/// How a bucket is written in keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketLabel {
    /// The UTC date the bucket starts on, `YYYYMMDD` (the reference deployment's). Needs buckets
    /// of whole days.
    Date,
    /// The UTC date the bucket starts on, `YYYY-MM-DD`. Needs buckets of whole days.
    IsoDate,
    /// The bucket's start in Unix seconds, e.g. `1795910400`.
    UnixSeconds,
}

impl BucketLabel {
    /// The label's length when it is fixed (always, until the year 10000), `None` otherwise.
    fn fixed_len(self) -> Option<usize> {
        match self {
            Self::Date => Some(8),
            Self::IsoDate => Some(10),
            Self::UnixSeconds => None,
        }
    }

    /// Whether `text` could occur inside a label: labels are made of digits and `-`.
    fn could_contain(self, text: &str) -> bool {
        text.chars().all(|c| c.is_ascii_digit() || c == '-')
    }
}

/// How long a counter lives after each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// The same time-to-live at every write.
    Fixed(Duration),
    /// Until the end of the key's bucket plus `grace`; needs a bucketed scheme.
    BucketEndPlus(Duration),
}

/// A key scheme setting that cannot work; [`KeyScheme::validate`] (and so the engine's
/// `build()`) returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeySchemeError {
    /// The prefix is the empty string.
    #[error("invalid key scheme: the prefix is empty")]
    EmptyPrefix,
    /// A hash tag was asked for, but the prefix or separator holds a brace, which would become
    /// the key's hash tag instead of the account.
    #[error("invalid key scheme: {0:?} contains a brace, which would take the place of the account's hash tag")]
    BraceBeforeHashTag(String),
    /// Two different accounts, or two different buckets, could be written as one key.
    #[error("invalid key scheme: ambiguous keys: {0}")]
    Ambiguous(String),
    /// The bucket period is not a whole number of seconds, at least 1.
    #[error("invalid key scheme: a bucket period must be a whole number of seconds, at least 1, got {0:?}")]
    BadPeriod(Duration),
    /// The TTL is shorter than one second.
    #[error("invalid key scheme: the TTL must be at least one second, got {0:?}")]
    TtlTooShort(Duration),
    /// [`Ttl::BucketEndPlus`] on a scheme without buckets.
    #[error("invalid key scheme: a TTL relative to the bucket's end needs time buckets")]
    TtlNeedsBuckets,
}

/// One time bucket of a scheme: its name in keys and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BucketSpan {
    label: Option<String>,
    end: Option<SystemTime>,
}

impl BucketSpan {
    /// When the next bucket starts, if the scheme has buckets.
    pub(crate) fn end(&self) -> Option<SystemTime> {
        self.end
    }
}

impl KeyScheme {
    /// `<prefix>:<account>`, no time buckets, expiring 30 days after the last write.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            separator: ":".into(),
            bucket: Bucket::None,
            label: BucketLabel::Date,
            bucket_first: false,
            hash_tag: false,
            escape: false,
            ttl: Ttl::Fixed(Duration::from_secs(30 * SECONDS_PER_DAY)),
        }
    }

    /// The reference deployment's scheme: `<prefix>:<account>:<YYYYMMDD>`, one counter per
    /// account per UTC day, the account exactly as given, expiring an hour after that day ends
    /// so that a daily budget resets by expiry. `KeyScheme::daily_utc("fair_use:dg_budget")`
    /// writes usage of `uid-42` on 29 Nov 2026 to `fair_use:dg_budget:uid-42:20261129`.
    pub fn daily_utc(prefix: impl Into<String>) -> Self {
        Self::new(prefix)
            .bucket(Bucket::UtcDay)
            .ttl(Ttl::BucketEndPlus(Duration::from_secs(3600)))
    }

    /// Sets the time buckets. The label becomes [`BucketLabel::Date`] for [`Bucket::UtcDay`] and
    /// [`BucketLabel::UnixSeconds`] for [`Bucket::Every`]; set another with
    /// [`KeyScheme::bucket_label`] afterwards.
    pub fn bucket(mut self, bucket: Bucket) -> Self {
        self.bucket = bucket;
        self.label = match bucket {
            Bucket::Every(_) => BucketLabel::UnixSeconds,
            Bucket::None | Bucket::UtcDay => BucketLabel::Date,
        };
        self
    }

    /// Sets how buckets are written in keys.
    pub fn bucket_label(mut self, label: BucketLabel) -> Self {
        self.label = label;
        self
    }

    /// Sets the text between the prefix, the account and the bucket (default `:`).
    pub fn separator(mut self, separator: impl Into<String>) -> Self {
        self.separator = separator.into();
        self
    }

    /// Puts the bucket before the account: `<prefix>:<bucket>:<account>`.
    pub fn bucket_first(mut self, first: bool) -> Self {
        self.bucket_first = first;
        self
    }

    /// Wraps the account in braces, a Redis Cluster hash tag, so that all keys of one account
    /// share a hash slot: `<prefix>:{<account>}:<bucket>` (default off). An account holding a
    /// brace needs [`KeyScheme::escape`] for its keys to keep one slot.
    pub fn hash_tag(mut self, on: bool) -> Self {
        self.hash_tag = on;
        self
    }

    /// Escapes account ids (default off): bytes other than ASCII letters, digits and
    /// `-_.@+=/` are written as `%XX`, so keys stay printable ASCII and braces never reach Redis.
    /// Different ids still give different keys.
    pub fn escape(mut self, on: bool) -> Self {
        self.escape = on;
        self
    }

    /// Sets the time-to-live.
    pub fn ttl(mut self, ttl: Ttl) -> Self {
        self.ttl = ttl;
        self
    }

    /// Checks the settings; the engine's `build()` calls this. Refuses any combination that
    /// could give two accounts, or two buckets, one key (see the module docs).
    pub fn validate(&self) -> Result<(), KeySchemeError> {
        if self.prefix.is_empty() {
            return Err(KeySchemeError::EmptyPrefix);
        }
        if self.hash_tag {
            for text in [&self.prefix, &self.separator] {
                if text.contains(['{', '}']) {
                    return Err(KeySchemeError::BraceBeforeHashTag(text.clone()));
                }
            }
        }
        let period = match self.bucket {
            Bucket::None => None,
            Bucket::UtcDay => Some(SECONDS_PER_DAY),
            Bucket::Every(period) => {
                if period.as_secs() == 0 || period.subsec_nanos() != 0 {
                    return Err(KeySchemeError::BadPeriod(period));
                }
                Some(period.as_secs())
            }
        };
        if let Some(period) = period {
            self.check_unambiguous(period)?;
        }
        match self.ttl {
            Ttl::Fixed(ttl) if ttl.as_secs() == 0 => Err(KeySchemeError::TtlTooShort(ttl)),
            Ttl::BucketEndPlus(_) if self.bucket == Bucket::None => {
                Err(KeySchemeError::TtlNeedsBuckets)
            }
            _ => Ok(()),
        }
    }

    /// A bucketed key is `prefix sep account sep label` (or `prefix sep label sep account`); it
    /// can be read back when the label's extent is known: fixed-length, or delimited by a
    /// separator that cannot occur inside a label. Two buckets need two labels.
    fn check_unambiguous(&self, period: u64) -> Result<(), KeySchemeError> {
        if self.label != BucketLabel::UnixSeconds && period % SECONDS_PER_DAY != 0 {
            return Err(KeySchemeError::Ambiguous(format!(
                "a date label names a day, but buckets of {period} s would give two buckets one \
                 date; use BucketLabel::UnixSeconds"
            )));
        }
        let delimited = !self.label.could_contain(&self.separator);
        if self.label.fixed_len().is_none() && !delimited {
            return Err(KeySchemeError::Ambiguous(format!(
                "the separator {:?} can occur inside a Unix-seconds label and the label's length \
                 varies, so an account ending in digits could not be told from the bucket; use a \
                 separator with a character other than digits and '-', or a date label",
                self.separator
            )));
        }
        Ok(())
    }
}

impl KeyScheme {
    /// The bucket that `at` falls in.
    pub(crate) fn span(&self, at: SystemTime) -> BucketSpan {
        let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let period = match self.bucket {
            Bucket::None => {
                return BucketSpan {
                    label: None,
                    end: None,
                }
            }
            Bucket::UtcDay => SECONDS_PER_DAY,
            Bucket::Every(period) => period.as_secs().max(1),
        };
        let start = secs - secs % period;
        let label = match self.label {
            BucketLabel::Date => utc_date(start / SECONDS_PER_DAY, ""),
            BucketLabel::IsoDate => utc_date(start / SECONDS_PER_DAY, "-"),
            BucketLabel::UnixSeconds => start.to_string(),
        };
        BucketSpan {
            label: Some(label),
            end: Some(UNIX_EPOCH + Duration::from_secs(start + period)),
        }
    }

    /// The key of `account` in `span`.
    pub(crate) fn key(&self, account: &str, span: &BucketSpan) -> String {
        let label = span.label.as_deref();
        let mut key = String::with_capacity(
            self.prefix.len() + 2 * self.separator.len() + account.len() + 16,
        );
        key.push_str(&self.prefix);
        key.push_str(&self.separator);
        if let (Some(label), true) = (label, self.bucket_first) {
            key.push_str(label);
            key.push_str(&self.separator);
        }
        if self.hash_tag {
            key.push('{');
        }
        if self.escape {
            escape_account(account, &mut key);
        } else {
            key.push_str(account);
        }
        if self.hash_tag {
            key.push('}');
        }
        if let (Some(label), false) = (label, self.bucket_first) {
            key.push_str(&self.separator);
            key.push_str(label);
        }
        key
    }

    /// The time-to-live to set on a key of `span` written at `now`: never zero.
    pub(crate) fn ttl_at(&self, span: &BucketSpan, now: SystemTime) -> Duration {
        let ttl = match (self.ttl, span.end) {
            (Ttl::Fixed(ttl), _) => ttl,
            (Ttl::BucketEndPlus(grace), Some(end)) => {
                end.duration_since(now).unwrap_or_default() + grace
            }
            // `validate` rules this out; a fixed minimum is still better than a panic.
            (Ttl::BucketEndPlus(grace), None) => grace,
        };
        ttl.max(Duration::from_secs(1))
    }
}

/// Reading what the engine writes: readers (a budget check, a status endpoint) and writers outside
/// the engine must name keys exactly as the flusher does.
impl KeyScheme {
    /// The key that usage of `account` added at `at` is written to, e.g.
    /// `fair_use:dg_budget:uid-42:20261129` for [`KeyScheme::daily_utc`]: what a budget check
    /// `GET`s. The flusher may write a moment's usage to the previous bucket's key (see
    /// `flusher`'s *Attribution*), never to a later one.
    ///
    /// ```
    /// use shardmeter::KeyScheme;
    /// use std::time::{Duration, UNIX_EPOCH};
    ///
    /// let scheme = KeyScheme::daily_utc("fair_use:dg_budget");
    /// let at = UNIX_EPOCH + Duration::from_secs(1_795_996_799); // 2026-11-29T23:59:59Z
    /// assert_eq!(scheme.key_at("uid-42", at), "fair_use:dg_budget:uid-42:20261129");
    /// assert_eq!(scheme.key_at("team:ops", at), "fair_use:dg_budget:team:ops:20261129");
    /// let midnight = UNIX_EPOCH + Duration::from_secs(1_795_996_800);
    /// assert_eq!(scheme.bucket_end(at), Some(midnight));
    /// assert_eq!(scheme.write_ttl(at), Duration::from_secs(1 + 3600)); // to midnight, plus 1 h
    /// ```
    pub fn key_at(&self, account: &str, at: SystemTime) -> String {
        self.key(account, &self.span(at))
    }

    /// The time-to-live the flusher sets on that key when it writes it at `at`.
    pub fn write_ttl(&self, at: SystemTime) -> Duration {
        self.ttl_at(&self.span(at), at)
    }

    /// When the bucket holding `at` ends, i.e. when a per-bucket budget resets; `None` for a
    /// scheme without time buckets.
    pub fn bucket_end(&self, at: SystemTime) -> Option<SystemTime> {
        self.span(at).end()
    }
}

/// Escapes an account id so that keys stay printable, hash tags stay intact and the mapping from
/// ids to keys is one-to-one.
fn escape_account(account: &str, out: &mut String) {
    for byte in account.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.@+=/".contains(&byte) {
            out.push(byte as char);
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// The UTC date `days` after 1970-01-01 as `YYYY<sep>MM<sep>DD` (Howard Hinnant's
/// `civil_from_days`).
fn utc_date(days: u64, separator: &str) -> String {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}{separator}{month:02}{separator}{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-29T23:59:59Z.
    const LAST_SECOND_OF_29_NOV_2026: u64 = 1_795_996_799;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn deployment_key(account: &str) -> String {
        KeyScheme::daily_utc("fair_use:dg_budget").key_at(account, at(LAST_SECOND_OF_29_NOV_2026))
    }

    #[test]
    fn daily_keys_are_the_reference_deployments_byte_for_byte() {
        assert_eq!(
            deployment_key("uid-42"),
            "fair_use:dg_budget:uid-42:20261129"
        );
        assert_eq!(
            deployment_key("team:ops"),
            "fair_use:dg_budget:team:ops:20261129"
        );
        assert_eq!(deployment_key("a{b}c"), "fair_use:dg_budget:a{b}c:20261129");
        assert_eq!(
            deployment_key("José 東京"),
            "fair_use:dg_budget:José 東京:20261129"
        );
        assert_eq!(
            deployment_key("AbCdEfGhIjKlMnOpQrStUvWxYz12"),
            "fair_use:dg_budget:AbCdEfGhIjKlMnOpQrStUvWxYz12:20261129"
        );
    }

    #[test]
    fn the_day_ends_at_utc_midnight_and_the_ttl_adds_an_hour() {
        let scheme = KeyScheme::daily_utc("fair_use:dg_budget");
        let before = scheme.span(at(LAST_SECOND_OF_29_NOV_2026));
        let after = scheme.span(at(LAST_SECOND_OF_29_NOV_2026 + 1));
        assert_eq!(
            scheme.key("uid-42", &after),
            "fair_use:dg_budget:uid-42:20261130"
        );
        assert_eq!(before.end(), Some(at(LAST_SECOND_OF_29_NOV_2026 + 1)));
        // One second before midnight: one second to the day's end plus the hour of grace.
        assert_eq!(
            scheme.ttl_at(&before, at(LAST_SECOND_OF_29_NOV_2026)),
            Duration::from_secs(3601)
        );
        // At the first second of a day: the whole day plus the hour.
        assert_eq!(
            scheme.write_ttl(at(LAST_SECOND_OF_29_NOV_2026 + 1)),
            Duration::from_secs(86_400 + 3600)
        );
    }

    #[test]
    fn date_labels_cover_leap_years_and_centuries() {
        assert_eq!(utc_date(0, ""), "19700101");
        assert_eq!(utc_date(11_016, ""), "20000229");
        assert_eq!(utc_date(11_017, "-"), "2000-03-01");
        assert_eq!(utc_date(19_782, ""), "20240229");
        assert_eq!(utc_date(47_541, ""), "21000301");
    }

    #[test]
    fn every_shape_option_is_written_literally() {
        let when = at(LAST_SECOND_OF_29_NOV_2026);
        let shaped = |scheme: KeyScheme| {
            scheme.validate().expect("valid scheme");
            scheme.key_at("uid-42", when)
        };
        let daily = || KeyScheme::daily_utc("usage");
        assert_eq!(shaped(KeyScheme::new("usage")), "usage:uid-42");
        assert_eq!(shaped(daily().separator("/")), "usage/uid-42/20261129");
        assert_eq!(shaped(daily().bucket_first(true)), "usage:20261129:uid-42");
        assert_eq!(
            shaped(daily().bucket_label(BucketLabel::IsoDate)),
            "usage:uid-42:2026-11-29"
        );
        assert_eq!(
            shaped(daily().bucket_label(BucketLabel::UnixSeconds)),
            "usage:uid-42:1795910400"
        );
        assert_eq!(shaped(daily().hash_tag(true)), "usage:{uid-42}:20261129");
        let hourly = KeyScheme::new("h")
            .bucket(Bucket::Every(Duration::from_secs(3600)))
            .ttl(Ttl::BucketEndPlus(Duration::ZERO));
        assert_eq!(shaped(hourly), "h:uid-42:1795993200"); // 23:00 UTC
    }

    #[test]
    fn escaping_is_opt_in_one_to_one_and_keeps_the_hash_tag() {
        let scheme = KeyScheme::new("p").hash_tag(true).escape(true);
        let span = scheme.span(at(0));
        let ids = ["a b", "a%20b", "a}b{", "a\nb", "é", "a:b", "a%3Ab", "%"];
        let keys: std::collections::HashSet<_> =
            ids.iter().map(|id| scheme.key(id, &span)).collect();
        assert_eq!(keys.len(), ids.len());
        assert_eq!(scheme.key("a}b{", &span), "p:{a%7Db%7B}");
        assert_eq!(scheme.key("é", &span), "p:{%C3%A9}");
        for key in &keys {
            assert_eq!(key.matches('{').count(), 1, "{key}");
            assert!(key.bytes().all(|b| b.is_ascii_graphic()), "{key}");
        }
        assert_eq!(
            KeyScheme::new("p").escape(true).key("team:ops", &span),
            "p:team%3Aops"
        );
    }

    #[test]
    fn periodic_buckets_align_to_the_epoch() {
        let scheme = KeyScheme::new("p")
            .bucket(Bucket::Every(Duration::from_secs(3600)))
            .ttl(Ttl::BucketEndPlus(Duration::ZERO));
        let span = scheme.span(at(7_300));
        assert_eq!(scheme.key("u", &span), "p:u:7200");
        assert_eq!(span.end(), Some(at(10_800)));
        assert_eq!(scheme.ttl_at(&span, at(10_800)), Duration::from_secs(1));
    }

    #[test]
    fn bad_settings_are_refused() {
        let refused = |scheme: KeyScheme| scheme.validate().unwrap_err();
        assert_eq!(refused(KeyScheme::new("")), KeySchemeError::EmptyPrefix);
        assert_eq!(
            refused(KeyScheme::new("a{b").hash_tag(true)),
            KeySchemeError::BraceBeforeHashTag("a{b".into())
        );
        assert!(
            KeyScheme::new("a{b").validate().is_ok(),
            "no tag: any prefix"
        );
        assert_eq!(
            refused(KeyScheme::new("p").ttl(Ttl::Fixed(Duration::ZERO))),
            KeySchemeError::TtlTooShort(Duration::ZERO)
        );
        assert_eq!(
            refused(KeyScheme::new("p").ttl(Ttl::BucketEndPlus(Duration::ZERO))),
            KeySchemeError::TtlNeedsBuckets
        );
        let period = Duration::from_millis(1500);
        assert_eq!(
            refused(KeyScheme::new("p").bucket(Bucket::Every(period))),
            KeySchemeError::BadPeriod(period)
        );
        assert!(KeyScheme::daily_utc("p").validate().is_ok());
    }

    #[test]
    fn schemes_that_could_share_a_key_are_refused() {
        let ambiguous =
            |scheme: KeyScheme| matches!(scheme.validate(), Err(KeySchemeError::Ambiguous(_)));
        let unix = || KeyScheme::daily_utc("p").bucket_label(BucketLabel::UnixSeconds);
        // No separator and a label of varying length: ("u1", "7200") vs ("u", "17200").
        assert!(ambiguous(unix().separator("")));
        // A separator made of label characters: ("u-1", "7200") vs ("u", "1-7200")-like splits.
        assert!(ambiguous(unix().separator("-")));
        assert!(ambiguous(unix().separator("1")));
        // A date names a day: hourly buckets would share it.
        assert!(ambiguous(
            KeyScheme::new("p")
                .bucket(Bucket::Every(Duration::from_secs(3600)))
                .bucket_label(BucketLabel::Date)
        ));
        // Fixed-length labels can be read back without a separator, even before the account.
        assert!(!ambiguous(KeyScheme::daily_utc("p").separator("")));
        assert!(!ambiguous(
            KeyScheme::daily_utc("p").separator("").bucket_first(true)
        ));
        assert!(!ambiguous(unix().separator("-x")));
        assert!(!ambiguous(
            KeyScheme::new("p")
                .bucket(Bucket::Every(Duration::from_secs(2 * 86_400)))
                .bucket_label(BucketLabel::IsoDate)
        ));
    }
}
