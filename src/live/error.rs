//! Why a live subscription was refused or ended, with the stable reasons that both
//! transports report.

/// Errors of subscribing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// The gateway has as many subscribers as it allows.
    #[error("too many live subscribers (limit {limit})")]
    TooManySubscribers {
        /// The configured limit.
        limit: usize,
    },
    /// The filter names more selectors than allowed.
    #[error("too many filters in one subscription ({count}, limit {limit})")]
    TooManyFilters {
        /// Filters requested.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The connection has as many subscriptions as it allows.
    #[error("too many subscriptions on this connection (limit {limit})")]
    TooManySubscriptions {
        /// The configured limit.
        limit: usize,
    },
    /// The subscription is no longer registered with the hub (its client was removed).
    #[error("this live subscription has ended")]
    Closed,
}

impl LiveError {
    /// A stable snake_case reason for problem types and WebSocket error frames.
    pub fn reason(&self) -> &'static str {
        match self {
            LiveError::TooManySubscribers { .. } => "too_many_subscribers",
            LiveError::TooManyFilters { .. } => "too_many_filters",
            LiveError::TooManySubscriptions { .. } => "too_many_subscriptions",
            LiveError::Closed => "subscription_closed",
        }
    }
}
