//! WebSocket close codes the server sends, each with the situation it names. Codes below 4000
//! are the standard ones (RFC 6455 §7.4.1); 4000–4999 are Parley's own.

/// A close code with its meaning; `reason` text accompanies it in the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// The session ended normally (the client closed, or the server finished).
    Normal = 1000,
    /// The server is shutting down; reconnect to another instance or later.
    GoingAway = 1001,
    /// Too many malformed frames or events in a row: the client is not speaking this protocol.
    PolicyViolation = 1008,
    /// A message exceeded the size limit announced in `session.created`.
    MessageTooBig = 1009,
    /// The server failed; the session cannot continue.
    InternalError = 1011,
    /// The server is at its session limit; retry later.
    TryAgainLater = 1013,
    /// The client stopped reading: the server's bounded send queue stayed full past the deadline.
    SlowConsumer = 4000,
    /// No message from the client for longer than the idle timeout.
    IdleTimeout = 4001,
    /// The session reached its time or byte budget; open a new one to go on.
    SessionLimit = 4002,
}

impl CloseCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a number, when it is one of Parley's.
    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1000 => Self::Normal,
            1001 => Self::GoingAway,
            1008 => Self::PolicyViolation,
            1009 => Self::MessageTooBig,
            1011 => Self::InternalError,
            1013 => Self::TryAgainLater,
            4000 => Self::SlowConsumer,
            4001 => Self::IdleTimeout,
            4002 => Self::SessionLimit,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in [
            CloseCode::Normal,
            CloseCode::GoingAway,
            CloseCode::PolicyViolation,
            CloseCode::MessageTooBig,
            CloseCode::InternalError,
            CloseCode::TryAgainLater,
            CloseCode::SlowConsumer,
            CloseCode::IdleTimeout,
            CloseCode::SessionLimit,
        ] {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
        }
        assert_eq!(CloseCode::from_code(1005), None);
    }
}
