//! Schedules: the `[[job]]` tables of the main config and of `schedules/*.toml`, checked once
//! at load so that a bad cron expression, an unknown subcommand or a missing plan file stops
//! the agent before it starts, with the job's name in the message. Also the pure timing rules
//! the agent runs by (next fire time with jitter, catch-up, what is due), kept free of clocks
//! and I/O so they are tested with made-up times.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::cli::{Cli, Command, PlanCommand};
use crate::error::{Error, Result};

/// One `[[job]]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Job {
    /// Letters, digits, '-' and '_'; unique across all schedule sources.
    pub name: String,
    /// The `cron` crate's syntax, with seconds: `sec min hour day-of-month month day-of-week
    /// [year]`, evaluated in UTC.
    pub cron: String,
    /// The drctl subcommand and its arguments, e.g. `["backup", "--type", "physical"]`.
    pub run: Vec<String>,
    /// A run that takes longer is stopped (cleanly, for backups). Default 12h.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Each run starts up to this much after its scheduled time (spreads load). Default 0.
    #[serde(default)]
    pub jitter: Option<String>,
    /// Run once at start if a scheduled run was missed while the agent was down.
    #[serde(default)]
    pub catch_up: bool,
}

/// The top level of a `schedules/*.toml` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    #[serde(default)]
    job: Vec<Job>,
}

/// The subcommands a job may run. `agent`, `demo` and `wal` make no sense on a schedule.
pub const JOB_COMMANDS: &[&str] = &[
    "backup", "verify", "expire", "drill", "plan", "status", "list", "restore",
];

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// A job that passed every load-time check.
#[derive(Debug, Clone)]
pub struct ScheduledJob {
    pub job: Job,
    /// Where it was defined (the config or a schedule file), for messages.
    pub source: PathBuf,
    pub schedule: cron::Schedule,
    pub timeout: Duration,
    pub jitter: Duration,
}

impl ScheduledJob {
    pub fn name(&self) -> &str {
        &self.job.name
    }

    /// Parses `run` as drctl's own command line (done at load, again for each run).
    pub fn command(&self) -> Result<Command> {
        parse_run(&self.job.run).map_err(|e| self.err(e))
    }

    fn err(&self, why: String) -> Error {
        Error::Config(format!(
            "{}: job {:?}: {why}",
            self.source.display(),
            self.job.name
        ))
    }

    /// The first scheduled time strictly after `t`, without jitter.
    pub fn slot_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&t).next()
    }

    /// When the run for `slot` starts: the slot plus this job's jitter for it. The jitter is
    /// a hash of the job name and the slot, so it differs between jobs and runs but a restart
    /// does not move a run.
    pub fn start_for(&self, slot: DateTime<Utc>) -> DateTime<Utc> {
        let j = self.jitter.as_millis() as u64;
        if j == 0 {
            return slot;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.job.name.hash(&mut h);
        slot.timestamp().hash(&mut h);
        slot + chrono::Duration::milliseconds((h.finish() % j) as i64)
    }

    /// Whether a run was missed while nothing ran: a slot after `last` that is already past.
    pub fn missed_since(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.slot_after(last).is_some_and(|s| s <= now)
    }
}

fn parse_run(run: &[String]) -> std::result::Result<Command, String> {
    let Some(first) = run.first() else {
        return Err(
            "`run` is empty: give a drctl subcommand, e.g. [\"backup\", \"--type\", \"physical\"]"
                .into(),
        );
    };
    if !JOB_COMMANDS.contains(&first.as_str()) {
        return Err(format!(
            "unknown subcommand {first:?} in `run` (a job can run: {})",
            JOB_COMMANDS.join(", ")
        ));
    }
    if run
        .iter()
        .any(|a| a == "--config" || a.starts_with("--config="))
    {
        return Err("`run` must not name --config: jobs use the agent's configuration".into());
    }
    let cli = Cli::try_parse_from(std::iter::once("drctl").chain(run.iter().map(String::as_str)))
        .map_err(|e| {
        let msg = e.to_string();
        format!(
            "`run` {:?} is not a valid drctl command line: {}",
            run,
            msg.lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
        )
    })?;
    Ok(cli.command)
}

/// Checks one job; `names` collects names to catch duplicates across sources.
fn check(job: Job, source: &Path, names: &mut HashSet<String>) -> Result<ScheduledJob> {
    let bad =
        |why: String| Error::Config(format!("{}: job {:?}: {why}", source.display(), job.name));
    if job.name.is_empty()
        || !job
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(bad(
            "`name` must be non-empty and use only letters, digits, '-' and '_'".into(),
        ));
    }
    if !names.insert(job.name.clone()) {
        return Err(bad("another job already has this name".into()));
    }
    let schedule = cron::Schedule::from_str(&job.cron).map_err(|e| {
        bad(format!(
            "invalid cron expression {:?}: {e} (the format has seconds: \"sec min hour day month weekday\", e.g. \"0 30 2 * * *\")",
            job.cron
        ))
    })?;
    let dur = |key: &str, v: &Option<String>, default: Duration| match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| bad(format!("`{key}` {s:?} is not a duration like \"30m\": {e}"))),
    };
    let timeout = dur("timeout", &job.timeout, DEFAULT_TIMEOUT)?;
    if timeout.is_zero() {
        return Err(bad("`timeout` must be longer than 0".into()));
    }
    let jitter = dur("jitter", &job.jitter, Duration::ZERO)?;
    let command = parse_run(&job.run).map_err(&bad)?;
    // Plans named by the job must exist and be valid now, not at 3 a.m. on the first.
    let plan = match &command {
        Command::Drill(a) => a.plan.clone(),
        Command::Plan(PlanCommand::Run(a)) => Some(a.file.clone()),
        Command::Plan(PlanCommand::Check { file }) => Some(file.clone()),
        _ => None,
    };
    if let Some(p) = plan {
        if !p.is_file() {
            return Err(bad(format!(
                "plan file {} does not exist{}",
                p.display(),
                if p.is_relative() {
                    " (relative paths are taken from the agent's working directory)"
                } else {
                    ""
                }
            )));
        }
        crate::restore::plan::Plan::load(&p)
            .map_err(|e| bad(format!("plan {}: {e}", p.display())))?;
    }
    Ok(ScheduledJob {
        job,
        source: source.to_path_buf(),
        schedule,
        timeout,
        jitter,
    })
}

/// Loads and checks every job: the config's `[[job]]` list, then each `*.toml` file of
/// `dir` in name order.
pub fn load(
    config_jobs: &[Job],
    config_path: &Path,
    dir: Option<&Path>,
) -> Result<Vec<ScheduledJob>> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for j in config_jobs {
        out.push(check(j.clone(), config_path, &mut names)?);
    }
    if let Some(dir) = dir {
        let rd = std::fs::read_dir(dir).map_err(|e| {
            Error::Config(format!(
                "cannot read schedules directory {}: {e}",
                dir.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", f.display())))?;
            let file: ScheduleFile = toml::from_str(&text).map_err(|e| {
                Error::Config(format!("{}: {}", f.display(), e.to_string().trim_end()))
            })?;
            for j in file.job {
                out.push(check(j, &f, &mut names)?);
            }
        }
    }
    Ok(out)
}

/// When each job runs next. Pure: the agent feeds it the time.
#[derive(Debug, Clone)]
pub struct Planner {
    /// Per job: the slot it runs for next and when that run starts (slot + jitter).
    next: Vec<Option<(DateTime<Utc>, DateTime<Utc>)>>,
}

impl Planner {
    /// Plans the first run of each job after `now`.
    pub fn new(jobs: &[ScheduledJob], now: DateTime<Utc>) -> Planner {
        Planner {
            next: jobs.iter().map(|j| Self::after(j, now)).collect(),
        }
    }

    fn after(j: &ScheduledJob, t: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        j.slot_after(t).map(|s| (s, j.start_for(s)))
    }

    /// The jobs whose start time has come, with the slot each runs for. Each is then planned
    /// for its first slot after `now`: slots missed while the caller was busy (or the host
    /// slept) collapse into this one run.
    pub fn due(
        &mut self,
        jobs: &[ScheduledJob],
        now: DateTime<Utc>,
    ) -> Vec<(usize, DateTime<Utc>)> {
        let mut out = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            if let Some((slot, start)) = self.next[i]
                && start <= now
            {
                out.push((i, slot));
                self.next[i] = Self::after(j, now.max(slot));
            }
        }
        out
    }

    /// When the earliest planned run starts.
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        self.next.iter().flatten().map(|(_, start)| *start).min()
    }

    /// The start time planned for job `i`.
    pub fn next_start(&self, i: usize) -> Option<DateTime<Utc>> {
        self.next[i].map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, cron: &str, run: &[&str]) -> Job {
        Job {
            name: name.into(),
            cron: cron.into(),
            run: run.iter().map(|s| s.to_string()).collect(),
            timeout: None,
            jitter: None,
            catch_up: false,
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn load_one(j: Job) -> Result<ScheduledJob> {
        load(&[j], Path::new("drctl.toml"), None).map(|mut v| v.remove(0))
    }

    #[test]
    fn load_time_errors_name_the_job() {
        let cases = [
            (
                job("nightly", "0 61 2 * * *", &["backup", "--type", "physical"]),
                "invalid cron",
            ),
            (
                job("nightly", "0 30 2 * * *", &["frobnicate"]),
                "unknown subcommand \"frobnicate\"",
            ),
            (
                job("nightly", "0 30 2 * * *", &["agent"]),
                "unknown subcommand \"agent\"",
            ),
            (
                job("nightly", "0 30 2 * * *", &["backup", "--type", "sideways"]),
                "not a valid drctl command line",
            ),
            (
                job(
                    "nightly",
                    "0 30 2 * * *",
                    &["drill", "--plan", "/nonexistent/drill.toml"],
                ),
                "does not exist",
            ),
            (
                job(
                    "nightly",
                    "0 30 2 * * *",
                    &["plan", "run", "/nonexistent/p.toml"],
                ),
                "does not exist",
            ),
            (
                job("nightly", "0 30 2 * * *", &["list", "--config", "/x"]),
                "--config",
            ),
            (job("bad name", "0 30 2 * * *", &["list"]), "`name`"),
            (job("nightly", "0 30 2 * * *", &[]), "`run` is empty"),
        ];
        for (j, want) in cases {
            let e = load_one(j.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{j:?}: {e}");
            assert!(e.contains(&format!("job {:?}", j.name)), "{e}");
            assert!(e.contains("drctl.toml"), "{e}");
        }
        let mut j = job("x", "0 30 2 * * *", &["list"]);
        j.timeout = Some("soon".into());
        assert!(load_one(j).unwrap_err().to_string().contains("`timeout`"));
        // Duplicate names across sources.
        let e = load(
            &[
                job("a", "* * * * * *", &["list"]),
                job("a", "* * * * * *", &["verify"]),
            ],
            Path::new("drctl.toml"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("another job already has this name"), "{e}");
    }

    #[test]
    fn planner_fires_each_slot_once_and_collapses_missed_slots() {
        let jobs = load(
            &[job("every2", "*/2 * * * * *", &["list"])],
            Path::new("c"),
            None,
        )
        .unwrap();
        let start = t("2026-12-03T10:00:00.500Z");
        let mut p = Planner::new(&jobs, start);
        assert_eq!(p.next_wake(), Some(t("2026-12-03T10:00:02Z")));
        assert!(p.due(&jobs, t("2026-12-03T10:00:01.999Z")).is_empty());
        assert_eq!(
            p.due(&jobs, t("2026-12-03T10:00:02Z")),
            vec![(0, t("2026-12-03T10:00:02Z"))]
        );
        // The same slot never fires twice.
        assert!(p.due(&jobs, t("2026-12-03T10:00:02.5Z")).is_empty());
        assert_eq!(p.next_wake(), Some(t("2026-12-03T10:00:04Z")));
        // Ten seconds late: one run, then planned after now.
        assert_eq!(p.due(&jobs, t("2026-12-03T10:00:14.1Z")).len(), 1);
        assert_eq!(p.next_wake(), Some(t("2026-12-03T10:00:16Z")));
    }

    #[test]
    fn jitter_is_bounded_and_stable() {
        let mut j = job("nightly", "0 30 2 * * *", &["list"]);
        j.jitter = Some("10m".into());
        let sj = load_one(j).unwrap();
        let mut distinct = HashSet::new();
        for day in 1..=20 {
            let slot = t(&format!("2026-12-{day:02}T02:30:00Z"));
            let start = sj.start_for(slot);
            assert!(start >= slot && start < slot + chrono::Duration::minutes(10));
            assert_eq!(start, sj.start_for(slot));
            distinct.insert(start - slot);
        }
        assert!(distinct.len() > 10, "jitter should vary between runs");
    }

    #[test]
    fn catch_up_sees_a_missed_slot() {
        let sj = load_one(job("nightly", "0 30 2 * * *", &["list"])).unwrap();
        let last = t("2026-12-01T02:30:05Z");
        assert!(!sj.missed_since(last, t("2026-12-02T02:29:59Z")));
        assert!(sj.missed_since(last, t("2026-12-02T02:30:00Z")));
        assert!(sj.missed_since(last, t("2026-12-05T00:00:00Z")));
    }

    #[test]
    fn shipped_default_schedules_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cwd = std::env::current_dir().unwrap();
        // Plan paths in the shipped file are relative to the project root.
        assert_eq!(cwd, dir);
        let jobs = load(&[], Path::new("drctl.toml"), Some(&dir.join("schedules"))).unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.name()).collect();
        for want in [
            "backup-physical",
            "backup-logical",
            "verify",
            "expire",
            "drill",
            "health",
        ] {
            assert!(names.contains(&want), "{names:?}");
        }
    }
}
