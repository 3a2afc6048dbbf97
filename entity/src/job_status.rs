//! The job state machine of `jobs.status` and `job_events.event_type` (hand-written).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The status of a job. Stored as its upper-case name; the database rejects anything else
/// (`jobs_status_check`, `job_events_event_type_check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for a worker to start it.
    Scheduled,
    /// A worker is running it.
    Running,
    /// Finished successfully (terminal).
    Completed,
    /// Someone asked for it to stop; the worker has not acknowledged yet.
    StopRequested,
    /// The worker is stopping it.
    Stopping,
    /// Stopped on request (terminal).
    Stopped,
    /// Failed with a recoverable error; retried with backoff (terminal until rescheduled).
    Error,
    /// Failed for good; never retried automatically (terminal).
    Fatal,
}

impl JobStatus {
    /// Every status, in the order of the schema's CHECK constraint.
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Scheduled,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::StopRequested,
        JobStatus::Stopping,
        JobStatus::Stopped,
        JobStatus::Error,
        JobStatus::Fatal,
    ];

    /// The name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Scheduled => "SCHEDULED",
            JobStatus::Running => "RUNNING",
            JobStatus::Completed => "COMPLETED",
            JobStatus::StopRequested => "STOP_REQUESTED",
            JobStatus::Stopping => "STOPPING",
            JobStatus::Stopped => "STOPPED",
            JobStatus::Error => "ERROR",
            JobStatus::Fatal => "FATAL",
        }
    }

    /// COMPLETED, STOPPED, ERROR and FATAL: the job is not running and will not run by itself.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Stopped | JobStatus::Error | JobStatus::Fatal
        )
    }

    /// The statuses a job may move to from this one (SCHEMA.md's transition table).
    pub const fn successors(self) -> &'static [JobStatus] {
        use JobStatus::*;
        match self {
            Scheduled => &[Running, StopRequested, Error, Fatal],
            Running => &[Completed, StopRequested, Error, Fatal],
            StopRequested => &[Stopping],
            Stopping => &[Stopped],
            Error | Stopped | Fatal => &[Scheduled],
            Completed => &[],
        }
    }

    /// The statuses a job may come to this one from.
    pub fn predecessors(self) -> Vec<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .filter(|from| from.successors().contains(&self))
            .collect()
    }

    /// Whether `self -> to` is a legal transition.
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        self.successors().contains(&to)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of the eight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownJobStatus(pub String);

impl fmt::Display for UnknownJobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown job status {:?}", self.0)
    }
}

impl std::error::Error for UnknownJobStatus {}

impl FromStr for JobStatus {
    type Err = UnknownJobStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownJobStatus(s.to_owned()))
    }
}

impl crate::jobs::Model {
    /// This job's status, parsed.
    pub fn job_status(&self) -> Result<JobStatus, UnknownJobStatus> {
        self.status.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_name() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
        }
        assert!("running".parse::<JobStatus>().is_err());
    }

    #[test]
    fn terminal_statuses_are_the_four_of_the_schema() {
        let terminal: Vec<_> = JobStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                JobStatus::Completed,
                JobStatus::Stopped,
                JobStatus::Error,
                JobStatus::Fatal
            ]
        );
    }

    #[test]
    fn completed_is_final_and_retries_go_back_to_scheduled() {
        assert!(JobStatus::Completed.successors().is_empty());
        for s in [JobStatus::Error, JobStatus::Stopped, JobStatus::Fatal] {
            assert_eq!(s.successors(), [JobStatus::Scheduled]);
        }
        assert_eq!(
            JobStatus::Scheduled.predecessors(),
            [JobStatus::Stopped, JobStatus::Error, JobStatus::Fatal]
        );
    }
}
