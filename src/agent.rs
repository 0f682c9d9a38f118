//! The scheduler agent: fires the schedule's jobs in process, never two runs of one job at
//! once, records every run in the repository's history, serves `/metrics` and `/health`, and
//! on SIGTERM lets running jobs finish (up to the stop timeout) or stops them cleanly.
//!
//! Timing rules live in [`crate::schedule::Planner`] (pure); this module is the runtime around
//! it. The clock is injected ([`Clock`]): tests start it at a chosen moment (`DRCTL_NOW`) and
//! it runs at real speed from there, so a restart "a day later" is a matter of configuration.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::command::{self, Ctx};
use crate::config::Config;
use crate::error::{Error, ExitCode, Result};
use crate::repo::{Repo, history};
use crate::schedule::{Planner, ScheduledJob};

/// How long a stopped or timed-out job gets to clean up (remove a half-written backup) before
/// it is dropped.
pub const CLEANUP_GRACE: Duration = Duration::from_secs(60);

/// How long a `/metrics` scrape may reuse the objectives it computed (they query the server
/// and the repository).
const STATUS_CACHE: Duration = Duration::from_secs(15);

/// The agent's notion of now.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Starts at `origin` and advances at real speed.
pub struct ShiftedClock {
    origin: DateTime<Utc>,
    started: Instant,
}

impl ShiftedClock {
    pub fn new(origin: DateTime<Utc>) -> ShiftedClock {
        ShiftedClock {
            origin,
            started: Instant::now(),
        }
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        self.origin + chrono::Duration::from_std(self.started.elapsed()).unwrap_or_default()
    }
}

/// `DRCTL_NOW` (RFC 3339) starts a [`ShiftedClock`] there; otherwise the wall clock.
pub fn clock_from_env() -> Arc<dyn Clock> {
    match std::env::var("DRCTL_NOW")
        .ok()
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
    {
        Some(t) => Arc::new(ShiftedClock::new(t.with_timezone(&Utc))),
        None => Arc::new(SystemClock),
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum RunResult {
    Ok,
    Failed,
    Timeout,
    /// Stopped by the agent's shutdown.
    Interrupted,
    /// Not started: the previous run of the job was still going.
    Skipped,
}

impl RunResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Failed => "failed",
            RunResult::Timeout => "timeout",
            RunResult::Interrupted => "interrupted",
            RunResult::Skipped => "skipped",
        }
    }
}

/// One run of a job, as kept in `history/job/<name>/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub job: String,
    pub run: Vec<String>,
    /// The scheduled slot this run is for.
    pub slot: DateTime<Utc>,
    /// Started at agent start for a slot missed while the agent was down.
    pub catch_up: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub result: RunResult,
    pub exit_code: i32,
    pub message: Option<String>,
    /// The command's `--json` output.
    pub output: serde_json::Value,
}

#[derive(Debug, Default)]
struct JobState {
    /// Set while a run is going; cancelling it stops the run.
    running: Option<CancellationToken>,
    runs: BTreeMap<RunResult, u64>,
    last_result: Option<RunResult>,
    last_finished_at: Option<DateTime<Utc>>,
    last_success_at: Option<DateTime<Utc>>,
    last_duration: Option<f64>,
    next_start: Option<DateTime<Utc>>,
}

/// What the agent did, returned when it stops.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub started_at: DateTime<Utc>,
    pub stopped_at: DateTime<Utc>,
    pub runs: BTreeMap<String, BTreeMap<String, u64>>,
}

pub struct Agent {
    jobs: Vec<ScheduledJob>,
    config: Config,
    config_path: Option<PathBuf>,
    repo: Repo,
    clock: Arc<dyn Clock>,
    state: Mutex<Vec<JobState>>,
    stopping: AtomicBool,
    started_at: DateTime<Utc>,
    status_cache: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl Agent {
    pub fn new(
        jobs: Vec<ScheduledJob>,
        config: Config,
        config_path: Option<PathBuf>,
        repo: Repo,
        clock: Arc<dyn Clock>,
    ) -> Agent {
        let n = jobs.len();
        let started_at = clock.now();
        Agent {
            jobs,
            config,
            config_path,
            repo,
            clock,
            state: Mutex::new((0..n).map(|_| JobState::default()).collect()),
            stopping: AtomicBool::new(false),
            started_at,
            status_cache: tokio::sync::Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Vec<JobState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `shutdown` is cancelled, then lets running jobs go on for up to
    /// `stop_timeout`, stops the rest cleanly, and returns.
    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        stop_timeout: Duration,
        listener: Option<TcpListener>,
    ) -> Result<Summary> {
        let server_stop = CancellationToken::new();
        let server = listener.map(|l| tokio::spawn(self.clone().serve(l, server_stop.clone())));
        let mut set = JoinSet::new();

        // Catch-up: a slot missed while the agent was down runs once now.
        let now = self.clock.now();
        for (i, j) in self.jobs.iter().enumerate() {
            if !j.job.catch_up {
                continue;
            }
            let last: Vec<RunRecord> = match history::load(
                &self.repo,
                &format!("job/{}", j.name()),
                1,
            )
            .await
            {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(job = j.name(), error = %e, "cannot read the job's history; no catch-up");
                    continue;
                }
            };
            match last.first() {
                Some(r) if j.missed_since(r.slot.max(r.started_at), now) => {
                    let slot = j.slot_after(r.slot.max(r.started_at)).unwrap_or(now);
                    tracing::info!(job = j.name(), missed = %slot, "catching up a run missed while the agent was down");
                    self.fire(i, slot, true, &mut set);
                }
                Some(_) => {}
                None => {
                    tracing::info!(
                        job = j.name(),
                        "no earlier run recorded; nothing to catch up"
                    )
                }
            }
        }

        let mut planner = Planner::new(&self.jobs, now);
        self.publish_plan(&planner);
        tracing::info!(jobs = self.jobs.len(), "agent started");
        loop {
            let now = self.clock.now();
            for (i, slot) in planner.due(&self.jobs, now) {
                self.fire(i, slot, false, &mut set);
            }
            self.publish_plan(&planner);
            // Reap finished runs so the set does not grow.
            while let Some(r) = set.try_join_next() {
                if let Err(e) = r {
                    tracing::error!(error = %e, "a job task panicked");
                }
            }
            // Sleep until the next start, but wake at least every 30 s in case the wall clock
            // jumped (suspend, NTP step).
            let wait = planner
                .next_wake()
                .map(|t| (t - self.clock.now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::from_secs(30))
                .min(Duration::from_secs(30));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
        }

        // Graceful stop.
        self.stopping.store(true, Ordering::SeqCst);
        let running = set.len();
        if running > 0 {
            tracing::info!(running, timeout = ?stop_timeout, "stopping: waiting for running jobs");
        }
        let deadline = tokio::time::Instant::now() + stop_timeout;
        while !set.is_empty() {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if !set.is_empty() {
            tracing::warn!(
                running = set.len(),
                "stop timeout reached: stopping the running jobs cleanly"
            );
            for s in self.state().iter() {
                if let Some(t) = &s.running {
                    t.cancel();
                }
            }
            let deadline = tokio::time::Instant::now() + CLEANUP_GRACE + Duration::from_secs(5);
            while !set.is_empty() {
                if tokio::time::timeout_at(deadline, set.join_next())
                    .await
                    .is_err()
                {
                    tracing::error!("jobs did not stop in time; abandoning them");
                    set.abort_all();
                    break;
                }
            }
        }
        server_stop.cancel();
        if let Some(s) = server {
            let _ = s.await;
        }
        let runs = self
            .jobs
            .iter()
            .zip(self.state().iter())
            .map(|(j, s)| {
                (
                    j.name().to_string(),
                    s.runs
                        .iter()
                        .map(|(r, n)| (r.as_str().to_string(), *n))
                        .collect(),
                )
            })
            .collect();
        tracing::info!("agent stopped");
        Ok(Summary {
            started_at: self.started_at,
            stopped_at: self.clock.now(),
            runs,
        })
    }

    fn publish_plan(&self, planner: &Planner) {
        let mut st = self.state();
        for (i, s) in st.iter_mut().enumerate() {
            s.next_start = planner.next_start(i);
        }
    }

    /// Starts a run of job `i`, or skips it (logged, counted, recorded) if one is going.
    fn fire(
        self: &Arc<Self>,
        i: usize,
        slot: DateTime<Utc>,
        catch_up: bool,
        set: &mut JoinSet<()>,
    ) {
        let job = &self.jobs[i];
        let token = {
            let mut st = self.state();
            if st[i].running.is_some() {
                *st[i].runs.entry(RunResult::Skipped).or_default() += 1;
                drop(st);
                tracing::warn!(
                    job = job.name(),
                    slot = %slot,
                    "skipped: the previous run of this job is still going"
                );
                let me = self.clone();
                set.spawn(async move {
                    let now = me.clock.now();
                    me.record(&RunRecord {
                        job: me.jobs[i].name().to_string(),
                        run: me.jobs[i].job.run.clone(),
                        slot,
                        catch_up,
                        started_at: now,
                        finished_at: now,
                        duration_seconds: 0.0,
                        result: RunResult::Skipped,
                        exit_code: 0,
                        message: Some("the previous run was still going".into()),
                        output: serde_json::Value::Null,
                    })
                    .await;
                });
                return;
            }
            let t = CancellationToken::new();
            st[i].running = Some(t.clone());
            t
        };
        set.spawn(self.clone().execute(i, slot, catch_up, token));
    }

    async fn execute(
        self: Arc<Self>,
        i: usize,
        slot: DateTime<Utc>,
        catch_up: bool,
        token: CancellationToken,
    ) {
        let job = &self.jobs[i];
        let started_at = self.clock.now();
        let t0 = Instant::now();
        tracing::info!(job = job.name(), run = ?job.job.run, "job started");
        let ctx = Ctx {
            config: self.config.clone(),
            json: true,
            config_path: self.config_path.clone(),
            cancel: token.clone(),
        };
        let (result, exit_code, message, output) = match job.command() {
            Err(e) => (
                RunResult::Failed,
                e.exit_code().code(),
                Some(e.to_string()),
                serde_json::Value::Null,
            ),
            Ok(cmd) => {
                let fut = command::dispatch(&ctx, &cmd);
                tokio::pin!(fut);
                enum Ending {
                    Done(Result<command::Output>),
                    Stopped(RunResult),
                }
                let ending = tokio::select! {
                    r = &mut fut => Ending::Done(r),
                    _ = tokio::time::sleep(job.timeout) => Ending::Stopped(RunResult::Timeout),
                    _ = token.cancelled() => Ending::Stopped(RunResult::Interrupted),
                };
                let (forced, r) = match ending {
                    Ending::Done(r) => (None, Some(r)),
                    Ending::Stopped(why) => {
                        tracing::warn!(job = job.name(), reason = why.as_str(), "stopping the job");
                        token.cancel();
                        (
                            Some(why),
                            tokio::time::timeout(CLEANUP_GRACE, &mut fut).await.ok(),
                        )
                    }
                };
                match (forced, r) {
                    (_, Some(Ok(out))) if out.exit == ExitCode::Ok => {
                        (RunResult::Ok, 0, None, out.json)
                    }
                    (forced, Some(Ok(out))) => (
                        forced.unwrap_or(RunResult::Failed),
                        out.exit.code(),
                        Some(format!("exited {}", out.exit.code())),
                        out.json,
                    ),
                    (forced, Some(Err(e))) => (
                        forced.unwrap_or(match e {
                            Error::Interrupted(_) => RunResult::Interrupted,
                            _ => RunResult::Failed,
                        }),
                        e.exit_code().code(),
                        Some(e.to_string()),
                        serde_json::Value::Null,
                    ),
                    (forced, None) => (
                        forced.unwrap_or(RunResult::Interrupted),
                        ExitCode::Interrupted.code(),
                        Some(format!("did not stop within {CLEANUP_GRACE:?}; abandoned")),
                        serde_json::Value::Null,
                    ),
                }
            }
        };
        let finished_at = self.clock.now();
        let duration = t0.elapsed().as_secs_f64();
        match result {
            RunResult::Ok => tracing::info!(job = job.name(), seconds = duration, "job finished"),
            _ => tracing::warn!(
                job = job.name(),
                result = result.as_str(),
                exit_code,
                message = message.as_deref().unwrap_or(""),
                seconds = duration,
                "job did not succeed"
            ),
        }
        self.record(&RunRecord {
            job: job.name().to_string(),
            run: job.job.run.clone(),
            slot,
            catch_up,
            started_at,
            finished_at,
            duration_seconds: duration,
            result,
            exit_code,
            message,
            output,
        })
        .await;
        let mut st = self.state();
        let s = &mut st[i];
        s.running = None;
        *s.runs.entry(result).or_default() += 1;
        s.last_result = Some(result);
        s.last_finished_at = Some(finished_at);
        s.last_duration = Some(duration);
        if result == RunResult::Ok {
            s.last_success_at = Some(finished_at);
        }
    }

    async fn record(&self, r: &RunRecord) {
        if let Err(e) = history::record(
            &self.repo,
            &format!("job/{}", r.job),
            r.started_at,
            &r.job,
            r,
        )
        .await
        {
            tracing::warn!(job = r.job, error = %e, "could not record the run in the history");
        }
    }

    /// The agent's own metrics, then the objectives (`drctl status --prometheus`).
    pub async fn metrics(&self) -> String {
        let mut o = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            o += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for (labels, v) in samples {
                o += &format!("{name}{labels} {v}\n");
            }
        };
        family(
            "drctl_agent_up",
            "gauge",
            "1 while the agent runs.",
            vec![(String::new(), 1.0)],
        );
        family(
            "drctl_agent_start_time_seconds",
            "gauge",
            "When the agent started.",
            vec![(String::new(), self.started_at.timestamp() as f64)],
        );
        {
            let st = self.state();
            let l = |j: &ScheduledJob| format!("{{job=\"{}\"}}", j.name());
            let mut runs = Vec::new();
            for (j, s) in self.jobs.iter().zip(st.iter()) {
                for r in [
                    RunResult::Ok,
                    RunResult::Failed,
                    RunResult::Timeout,
                    RunResult::Interrupted,
                    RunResult::Skipped,
                ] {
                    runs.push((
                        format!("{{job=\"{}\",result=\"{}\"}}", j.name(), r.as_str()),
                        *s.runs.get(&r).unwrap_or(&0) as f64,
                    ));
                }
            }
            family(
                "drctl_job_runs_total",
                "counter",
                "Job runs since the agent started, by result.",
                runs,
            );
            let pick = |f: &dyn Fn(&JobState) -> Option<f64>| {
                self.jobs
                    .iter()
                    .zip(st.iter())
                    .filter_map(|(j, s)| f(s).map(|v| (l(j), v)))
                    .collect::<Vec<_>>()
            };
            family(
                "drctl_job_running",
                "gauge",
                "1 while a run of the job is going.",
                pick(&|s| Some(if s.running.is_some() { 1.0 } else { 0.0 })),
            );
            family(
                "drctl_job_last_success_timestamp_seconds",
                "gauge",
                "When the job last finished successfully (this agent).",
                pick(&|s| s.last_success_at.map(|t| t.timestamp() as f64)),
            );
            family(
                "drctl_job_last_duration_seconds",
                "gauge",
                "How long the job's last run took.",
                pick(&|s| s.last_duration),
            );
            family(
                "drctl_job_next_run_timestamp_seconds",
                "gauge",
                "When the job runs next.",
                pick(&|s| s.next_start.map(|t| t.timestamp() as f64)),
            );
        }
        o += &self.status_metrics().await;
        o
    }

    async fn status_metrics(&self) -> String {
        let mut cache = self.status_cache.lock().await;
        if let Some((at, text)) = cache.as_ref()
            && at.elapsed() < STATUS_CACHE
        {
            return text.clone();
        }
        let ctx = Ctx::new(self.config.clone(), true, self.config_path.clone());
        let text = match command::status::compute(&ctx).await {
            Ok(st) => format!(
                "# HELP drctl_status_up 1 if the objectives could be computed.\n# TYPE drctl_status_up gauge\ndrctl_status_up 1\n{}",
                command::status::prometheus_text(&st)
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot compute the objectives for /metrics");
                "# HELP drctl_status_up 1 if the objectives could be computed.\n# TYPE drctl_status_up gauge\ndrctl_status_up 0\n".to_string()
            }
        };
        *cache = Some((Instant::now(), text.clone()));
        text
    }

    /// `/health`: 200 while the agent schedules, 503 while it stops; the jobs' state as JSON.
    pub fn health(&self) -> (bool, serde_json::Value) {
        let stopping = self.stopping.load(Ordering::SeqCst);
        let st = self.state();
        let jobs: Vec<serde_json::Value> = self
            .jobs
            .iter()
            .zip(st.iter())
            .map(|(j, s)| {
                serde_json::json!({
                    "name": j.name(),
                    "cron": j.job.cron,
                    "running": s.running.is_some(),
                    "next_run": s.next_start.map(|t| t.to_rfc3339()),
                    "last_result": s.last_result.map(|r| r.as_str()),
                    "last_finished_at": s.last_finished_at.map(|t| t.to_rfc3339()),
                })
            })
            .collect();
        (
            !stopping,
            serde_json::json!({
                "status": if stopping { "stopping" } else { "ok" },
                "started_at": self.started_at.to_rfc3339(),
                "jobs": jobs,
            }),
        )
    }

    async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.respond(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    }

    async fn respond<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, ctype: &str, body: String| {
            Response::builder()
                .status(code)
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts")
        };
        if req.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics().await,
            ),
            "/health" => {
                let (ok, body) = self.health();
                reply(
                    if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    },
                    "application/json",
                    body.to_string() + "\n",
                )
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /metrics or /health\n".into(),
            ),
        }
    }
}
