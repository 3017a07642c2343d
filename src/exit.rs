//! How the process ends: the exit codes every command maps its result to
//! (SPEC.md). A leaf: any command may import it.

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok,
    /// 1: a runtime failure (for `once`/`check`: something failed).
    Failure,
    /// 2: bad command line.
    Usage,
    /// 78 (EX_CONFIG): invalid configuration; systemd does not restart on it.
    Config,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Failure => 1,
            Self::Usage => 2,
            Self::Config => 78,
        }
    }
}
