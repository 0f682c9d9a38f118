//! The clock. Everything that judges age (backup age, RPO, drill freshness, retention) asks
//! here, so tests can pin "now" with `DRCTL_NOW` (RFC 3339) instead of waiting.

use chrono::{DateTime, Utc};

pub fn now() -> DateTime<Utc> {
    std::env::var("DRCTL_NOW")
        .ok()
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(Utc::now)
}
