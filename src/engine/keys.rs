//! Key schemes: how an account and a time bucket become a counter key, and how long it lives.
//!
//! A key is `<prefix>:{<account>}` plus `:<bucket>` when the scheme has time buckets. The
//! account sits in braces, a Redis Cluster hash tag, so all of one account's keys (and the
//! dedup marker of a batch that starts with it) land in one hash slot. Account ids are escaped
//! so that keys stay valid and two different ids never give the same key: bytes other than
//! ASCII letters, digits and `-_.@+=/` are written as `%XX` (so `%`, `{`, `}`, `:`, spaces,
//! newlines and non-ASCII text are all escaped).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECONDS_PER_DAY: u64 = 86_400;

/// How counters are named and when they expire. See [`KeyScheme::daily_utc`] for the reference
/// deployment's scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScheme {
    prefix: String,
    bucket: Bucket,
    ttl: Ttl,
}

/// How usage is split over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// One counter per account, forever (until it expires).
    None,
    /// One counter per account per UTC day, named `YYYYMMDD`.
    UtcDay,
    /// One counter per account per period, aligned to the Unix epoch and named by the period's
    /// start in Unix seconds.
    Every(Duration),
}

/// How long a counter lives after each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// The same time-to-live at every write.
    Fixed(Duration),
    /// Until the end of the key's bucket plus `grace`; needs a bucketed scheme.
    BucketEndPlus(Duration),
}

/// A scheme setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key scheme: {0}")]
pub struct KeySchemeError(String);

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
    /// `<prefix>:{<account>}`, no time buckets, expiring 30 days after the last write.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            bucket: Bucket::None,
            ttl: Ttl::Fixed(Duration::from_secs(30 * SECONDS_PER_DAY)),
        }
    }

    /// The reference deployment's scheme: `<prefix>:{<account>}:<YYYYMMDD>`, one counter per
    /// account per UTC day, expiring an hour after that day ends, so a daily budget resets by
    /// expiry. `KeyScheme::daily_utc("fair_use:dg_budget")` gives
    /// `fair_use:dg_budget:{uid-42}:20261129`.
    pub fn daily_utc(prefix: impl Into<String>) -> Self {
        Self::new(prefix)
            .bucket(Bucket::UtcDay)
            .ttl(Ttl::BucketEndPlus(Duration::from_secs(3600)))
    }

    /// Sets the time buckets.
    pub fn bucket(mut self, bucket: Bucket) -> Self {
        self.bucket = bucket;
        self
    }

    /// Sets the time-to-live.
    pub fn ttl(mut self, ttl: Ttl) -> Self {
        self.ttl = ttl;
        self
    }

    /// Checks the settings; the engine builder calls this.
    pub fn validate(&self) -> Result<(), KeySchemeError> {
        if self.prefix.is_empty() {
            return Err(KeySchemeError("the prefix is empty".into()));
        }
        if self.prefix.contains(['{', '}']) {
            return Err(KeySchemeError(format!(
                "the prefix {:?} contains a brace; braces are reserved for the account's hash tag",
                self.prefix
            )));
        }
        if let Bucket::Every(period) = self.bucket {
            if period.as_secs() == 0 || period.subsec_nanos() != 0 {
                return Err(KeySchemeError(format!(
                    "a bucket period must be a whole number of seconds, at least 1, got {period:?}"
                )));
            }
        }
        match self.ttl {
            Ttl::Fixed(ttl) if ttl.as_secs() == 0 => Err(KeySchemeError(format!(
                "the TTL must be at least one second, got {ttl:?}"
            ))),
            Ttl::BucketEndPlus(_) if self.bucket == Bucket::None => Err(KeySchemeError(
                "a TTL relative to the bucket's end needs time buckets".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The bucket that `at` falls in.
    pub(crate) fn span(&self, at: SystemTime) -> BucketSpan {
        let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        match self.bucket {
            Bucket::None => BucketSpan {
                label: None,
                end: None,
            },
            Bucket::UtcDay => {
                let day = secs / SECONDS_PER_DAY;
                BucketSpan {
                    label: Some(utc_date_label(day)),
                    end: Some(UNIX_EPOCH + Duration::from_secs((day + 1) * SECONDS_PER_DAY)),
                }
            }
            Bucket::Every(period) => {
                let period = period.as_secs();
                let start = secs - secs % period;
                BucketSpan {
                    label: Some(start.to_string()),
                    end: Some(UNIX_EPOCH + Duration::from_secs(start + period)),
                }
            }
        }
    }

    /// The key of `account` in `span`.
    pub(crate) fn key(&self, account: &str, span: &BucketSpan) -> String {
        let mut key = String::with_capacity(self.prefix.len() + account.len() + 16);
        key.push_str(&self.prefix);
        key.push_str(":{");
        escape_account(account, &mut key);
        key.push('}');
        if let Some(label) = &span.label {
            key.push(':');
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
    /// `fair_use:dg_budget:{uid-42}:20261129` for [`KeyScheme::daily_utc`]: what a budget check
    /// `GET`s. The flusher may write a moment's usage to the previous bucket's key (see
    /// `flusher`'s *Attribution*), never to a later one.
    ///
    /// ```
    /// use shardmeter::KeyScheme;
    /// use std::time::{Duration, UNIX_EPOCH};
    ///
    /// let scheme = KeyScheme::daily_utc("fair_use:dg_budget");
    /// let at = UNIX_EPOCH + Duration::from_secs(1_795_996_799); // 2026-11-29T23:59:59Z
    /// assert_eq!(scheme.key_at("uid-42", at), "fair_use:dg_budget:{uid-42}:20261129");
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

/// `YYYYMMDD` of the UTC day `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn utc_date_label(days: u64) -> String {
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
    format!("{year:04}{month:02}{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn daily_keys_match_the_reference_deployment() {
        let scheme = KeyScheme::daily_utc("fair_use:dg_budget");
        // 2026-11-29T23:59:59Z and one second later.
        let before = scheme.span(at(1_795_996_799));
        let after = scheme.span(at(1_795_996_800));
        assert_eq!(
            scheme.key("uid-42", &before),
            "fair_use:dg_budget:{uid-42}:20261129"
        );
        assert_eq!(
            scheme.key("uid-42", &after),
            "fair_use:dg_budget:{uid-42}:20261130"
        );
        assert_eq!(before.end(), Some(at(1_795_996_800)));
        // One second before midnight: one second to the day's end plus the hour of grace.
        assert_eq!(
            scheme.ttl_at(&before, at(1_795_996_799)),
            Duration::from_secs(3601)
        );
    }

    #[test]
    fn date_labels_cover_leap_years_and_centuries() {
        assert_eq!(utc_date_label(0), "19700101");
        assert_eq!(utc_date_label(11_016), "20000229");
        assert_eq!(utc_date_label(11_017), "20000301");
        assert_eq!(utc_date_label(19_782), "20240229");
        assert_eq!(utc_date_label(47_541), "21000301");
    }

    #[test]
    fn escaping_is_one_to_one_and_keeps_the_hash_tag() {
        let scheme = KeyScheme::new("p");
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
    }

    #[test]
    fn periodic_buckets_align_to_the_epoch() {
        let scheme = KeyScheme::new("p")
            .bucket(Bucket::Every(Duration::from_secs(3600)))
            .ttl(Ttl::BucketEndPlus(Duration::ZERO));
        let span = scheme.span(at(7_300));
        assert_eq!(scheme.key("u", &span), "p:{u}:7200");
        assert_eq!(span.end(), Some(at(10_800)));
        assert_eq!(scheme.ttl_at(&span, at(10_800)), Duration::from_secs(1));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(KeyScheme::new("").validate().is_err());
        assert!(KeyScheme::new("a{b").validate().is_err());
        assert!(KeyScheme::new("p")
            .ttl(Ttl::Fixed(Duration::ZERO))
            .validate()
            .is_err());
        assert!(KeyScheme::new("p")
            .ttl(Ttl::BucketEndPlus(Duration::ZERO))
            .validate()
            .is_err());
        assert!(KeyScheme::new("p")
            .bucket(Bucket::Every(Duration::from_millis(1500)))
            .validate()
            .is_err());
        assert!(KeyScheme::daily_utc("p").validate().is_ok());
    }
}
