//! The scheduler agent against a real cluster: jobs on a seconds-level schedule, overlap
//! skipping, /metrics and /health, SIGTERM during a backup, catch-up with an injected clock,
//! and load-time errors.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Env, RepoKind, code, sql, stderr};
use drctl::command::demo::{SAMPLE_SCHEMA, sample_data_sql};

const ARCHIVING: &str =
    "wal_level = replica\narchive_mode = on\narchive_command = ''\narchive_timeout = 30\n";

/// Writes `text` as `<dir>/<name>` readable by the drctl process.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    if let Some(u) = common::owner() {
        drctl::pg::cluster::chown_tree(dir, &u).unwrap();
    }
    p
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(env: &Env, args: &[&str], extra_env: &[(&str, &str)]) -> Agent {
        let log = env.dir.path().join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let f = std::fs::File::create(&log).unwrap();
        let mut a = vec!["agent"];
        a.extend_from_slice(args);
        let mut cmd = env.command(&a);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
    }

    /// Waits (bounded) for the agent to exit; returns its exit code.
    fn wait(&mut self, limit: Duration) -> i32 {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("agent did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 200 ms until it is true or `limit` passes.
fn wait_for(what: &str, limit: Duration, agent: &Agent, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            panic!(
                "timed out after {limit:?} waiting for {what}; agent log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// Parses Prometheus text exposition format strictly enough to catch what a scraper rejects:
/// metric and label name syntax, label quoting, numeric values, one TYPE per family before
/// its samples, and families not interleaved. Returns samples and types by family.
fn parse_prometheus(text: &str) -> (Samples, BTreeMap<String, String>) {
    fn valid_name(n: &str) -> bool {
        let mut c = n.chars();
        matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }
    let mut samples: Samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    let mut done: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for (no, line) in text.lines().enumerate() {
        let ctx = || format!("line {}: {line:?}", no + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kw = parts.next().unwrap();
            let name = parts.next().unwrap_or_default().to_string();
            match kw {
                "HELP" => assert!(valid_name(&name), "{}", ctx()),
                "TYPE" => {
                    assert!(valid_name(&name), "{}", ctx());
                    let t = parts.next().unwrap_or_default();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{}",
                        ctx()
                    );
                    assert!(
                        types.insert(name.clone(), t.to_string()).is_none(),
                        "second TYPE: {}",
                        ctx()
                    );
                    assert!(
                        !samples.contains_key(&name),
                        "TYPE after samples: {}",
                        ctx()
                    );
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.starts_with('#'), "{}", ctx());
        let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", ctx()));
        let v: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {}", ctx())),
        };
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels.to_string(), BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("{}", ctx()));
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, r) = rest
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("{}", ctx()));
                    assert!(valid_name(k), "label name: {}", ctx());
                    let mut val = String::new();
                    let mut chars = r.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((_, '\\')) => {
                                let (_, e) = chars.next().unwrap_or_else(|| panic!("{}", ctx()));
                                val.push(e);
                            }
                            Some((i, '"')) => break i,
                            Some((_, c)) => val.push(c),
                            None => panic!("unterminated label: {}", ctx()),
                        }
                    };
                    labels.insert(k.to_string(), val);
                    rest = r[end + 1..].trim_start_matches(',');
                }
                (n.to_string(), labels)
            }
        };
        assert!(valid_name(&name), "{}", ctx());
        let family = types
            .keys()
            .filter(|f| {
                name == **f
                    || name
                        .strip_prefix(f.as_str())
                        .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
            })
            .max_by_key(|f| f.len())
            .cloned()
            .unwrap_or_else(|| name.clone());
        if current.as_deref() != Some(family.as_str()) {
            assert!(
                !done.contains(&family),
                "family {family} interleaved: {}",
                ctx()
            );
            if let Some(c) = current.take() {
                done.push(c);
            }
            current = Some(family.clone());
        }
        samples.entry(name).or_default().push((labels, v));
    }
    (samples, types)
}

fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.get(name)?.iter().find_map(|(l, v)| {
        labels
            .iter()
            .all(|(k, want)| l.get(*k).map(String::as_str) == Some(*want))
            .then_some(*v)
    })
}

fn history(env: &Env, job: &str) -> Vec<serde_json::Value> {
    let dir = env.repo_dir.join(format!("test/history/job/{job}"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
            Some(v["body"].clone())
        })
        .collect()
}

fn backups(env: &Env) -> Vec<serde_json::Value> {
    env.json(&["list"]).as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_runs_jobs_skips_overlaps_serves_metrics_and_stops_on_sigterm() {
    let (tc, env) = common::cluster_and_env(ARCHIVING, RepoKind::Fs);
    let ep = tc.cluster.endpoint();
    env.enable_archiving(&ep).await;
    sql(&ep, "postgres", "CREATE DATABASE app").await;
    sql(&ep, "app", SAMPLE_SCHEMA).await;
    sql(&ep, "app", &sample_data_sql(500)).await;
    // One archived segment, so the server can tell the RPO exposure.
    common::switch_and_wait_archived(&ep).await;

    let dir = env.dir.path().join("schedules");
    let slow = write(
        &env.dir.path().join("plans"),
        "slow.toml",
        "name = \"slow\"\n[target]\nkind = \"scratch\"\n[restore]\npitr = \"latest\"\n[[stage]]\nname = \"wait\"\nkind = \"health\"\n  [[stage.check]]\n  type = \"command\"\n  argv = [\"sleep\", \"3\"]\n",
    );
    write(
        &dir,
        "jobs.toml",
        &format!(
            "[[job]]\nname = \"logical\"\ncron = \"*/2 * * * * *\"\nrun = [\"backup\", \"--type\", \"logical\"]\ntimeout = \"1m\"\n\n[[job]]\nname = \"slow\"\ncron = \"* * * * * *\"\nrun = [\"plan\", \"run\", \"{}\", \"--health-only\"]\n",
            slow.display()
        ),
    );
    let port = drctl::pg::cluster::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Agent::start(
        &env,
        &["--schedules", dir.to_str().unwrap(), "--listen", &listen],
        &[],
    );

    // At least two scheduled logical backups, within a bounded time.
    wait_for(
        "two scheduled backups",
        Duration::from_secs(90),
        &agent,
        || backups(&env).len() >= 2,
    );
    // The slow job (3 s of work every second) ran and its overlapping slots were skipped.
    let mut text = String::new();
    wait_for(
        "an ok run and a skipped overlap of the slow job",
        Duration::from_secs(60),
        &agent,
        || {
            text = http_get(port, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            let (s, _) = parse_prometheus(&text);
            value(
                &s,
                "drctl_job_runs_total",
                &[("job", "slow"), ("result", "ok")],
            )
            .unwrap_or(0.0)
                >= 1.0
                && value(
                    &s,
                    "drctl_job_runs_total",
                    &[("job", "slow"), ("result", "skipped")],
                )
                .unwrap_or(0.0)
                    >= 1.0
        },
    );
    assert!(agent.log().contains("skipped"), "{}", agent.log());

    // /metrics is valid exposition format and carries every documented family.
    let (status, text) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let (samples, types) = parse_prometheus(&text);
    for name in [
        "drctl_backup_last_success_timestamp_seconds",
        "drctl_backup_duration_seconds",
        "drctl_backup_size_bytes",
        "drctl_wal_archive_lag_seconds",
        "drctl_rpo_seconds",
        "drctl_rto_last_drill_seconds",
        "drctl_drill_last_success_timestamp_seconds",
        "drctl_objective_violated",
        "drctl_verify_failures_total",
        "drctl_job_runs_total",
        "drctl_agent_up",
    ] {
        assert!(
            types.contains_key(name),
            "{name} missing from /metrics:\n{text}"
        );
    }
    assert_eq!(types["drctl_verify_failures_total"], "counter");
    assert_eq!(types["drctl_job_runs_total"], "counter");
    assert!(
        value(
            &samples,
            "drctl_backup_last_success_timestamp_seconds",
            &[("type", "logical")]
        )
        .unwrap()
            > 1.0e9
    );
    assert!(value(&samples, "drctl_backup_size_bytes", &[("type", "logical")]).unwrap() > 0.0);
    assert!(
        value(&samples, "drctl_rpo_seconds", &[]).is_some(),
        "archiving is on: RPO is known\n{text}"
    );
    assert_eq!(
        value(
            &samples,
            "drctl_objective_violated",
            &[("objective", "rto")]
        ),
        Some(1.0),
        "no drill yet: unproven"
    );
    assert_eq!(value(&samples, "drctl_agent_up", &[]), Some(1.0));
    assert_eq!(value(&samples, "drctl_status_up", &[]), Some(1.0));

    let (status, body) = http_get(port, "/health").unwrap();
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);

    agent.sigterm();
    assert_eq!(agent.wait(Duration::from_secs(120)), 0, "{}", agent.log());

    // Every run is in the history; every listed backup is whole.
    let runs = history(&env, "logical");
    let ok = runs.iter().filter(|r| r["result"] == "ok").count();
    assert!(ok >= 2, "{runs:?}");
    let ids: Vec<String> = runs
        .iter()
        .filter_map(|r| r["output"]["id"].as_str().map(String::from))
        .collect();
    for b in backups(&env) {
        assert!(
            ids.contains(&b["id"].as_str().unwrap().to_string()),
            "backup {b} has no run record"
        );
    }
    let slow_runs = history(&env, "slow");
    assert!(
        slow_runs.iter().any(|r| r["result"] == "skipped"),
        "{slow_runs:?}"
    );
    env.ok(&["verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_backup_aborts_it_cleanly_and_exits_zero() {
    let tc = common::cluster("");
    let ep = tc.cluster.endpoint();
    let env = Env::new(&ep, RepoKind::Fs);
    sql(&ep, "postgres", "CREATE DATABASE app").await;
    sql(&ep, "app", SAMPLE_SCHEMA).await;
    sql(&ep, "app", &sample_data_sql(500)).await;
    let dir = env.dir.path().join("schedules");
    write(
        &dir,
        "jobs.toml",
        "[[job]]\nname = \"logical\"\ncron = \"* * * * * *\"\nrun = [\"backup\", \"--type\", \"logical\"]\n",
    );
    let port = drctl::pg::cluster::free_port();
    let listen = format!("127.0.0.1:{port}");
    // Every object put of a backup is held 2 s: the backup takes several seconds.
    let mut agent = Agent::start(
        &env,
        &[
            "--schedules",
            dir.to_str().unwrap(),
            "--listen",
            &listen,
            "--stop-timeout",
            "0s",
        ],
        &[("DRCTL_FAULT", "delay-put:/backups/")],
    );
    let backup_dir = env.repo_dir.join("test/backups");
    let files = |d: &Path| -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![d.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out
    };
    // Wait until the backup has written its first object and is still going.
    wait_for(
        "a backup in progress with an object written",
        Duration::from_secs(60),
        &agent,
        || !files(&backup_dir).is_empty(),
    );
    let (_, body) = http_get(port, "/health").unwrap();
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["jobs"][0]["running"], true, "{h}");

    agent.sigterm();
    assert_eq!(agent.wait(Duration::from_secs(90)), 0, "{}", agent.log());
    assert!(backups(&env).is_empty(), "no backup may be listed");
    assert!(
        files(&backup_dir).is_empty(),
        "objects left behind: {:?}",
        files(&backup_dir)
    );
    // One run started and was interrupted; the slots that came while it ran were skipped.
    let runs = history(&env, "logical");
    let (skipped, started): (Vec<_>, Vec<_>) = runs.iter().partition(|r| r["result"] == "skipped");
    assert_eq!(started.len(), 1, "{runs:?}");
    assert_eq!(started[0]["result"], "interrupted", "{runs:?}");
    assert_eq!(started[0]["exit_code"], 13);
    assert!(skipped.iter().all(|r| r["exit_code"] == 0), "{runs:?}");
    // The repository lock was released: a backup now runs at once.
    env.ok(&["backup", "--type", "logical", "--lock-timeout", "0s"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn catch_up_runs_a_missed_slot_once_with_an_injected_clock() {
    let tc = common::cluster("");
    let env = Env::new(&tc.cluster.endpoint(), RepoKind::Fs);
    let dir = env.dir.path().join("schedules");
    write(
        &dir,
        "nightly.toml",
        "[[job]]\nname = \"nightly\"\ncron = \"0 0 3 * * *\"\nrun = [\"list\"]\ncatch-up = true\n",
    );
    let sched = dir.to_str().unwrap();

    // 2 s before the slot: it runs on time.
    let mut a = Agent::start(
        &env,
        &["--schedules", sched],
        &[("DRCTL_NOW", "2026-01-01T02:59:58Z")],
    );
    wait_for("the 03:00 run", Duration::from_secs(30), &a, || {
        history(&env, "nightly").len() == 1
    });
    a.sigterm();
    assert_eq!(a.wait(Duration::from_secs(30)), 0, "{}", a.log());
    let h = history(&env, "nightly");
    assert_eq!(h[0]["slot"], "2026-01-01T03:00:00Z");
    assert_eq!(h[0]["catch_up"], false);
    assert_eq!(h[0]["result"], "ok");

    // Down for two days and a half: one catch-up run at start, for the first missed slot.
    let mut b = Agent::start(
        &env,
        &["--schedules", sched],
        &[("DRCTL_NOW", "2026-01-03T12:00:00Z")],
    );
    wait_for("the catch-up run", Duration::from_secs(30), &b, || {
        history(&env, "nightly").len() == 2
    });
    b.sigterm();
    assert_eq!(b.wait(Duration::from_secs(30)), 0, "{}", b.log());
    let h = history(&env, "nightly");
    assert_eq!(h[1]["catch_up"], true);
    assert_eq!(h[1]["slot"], "2026-01-02T03:00:00Z");

    // Restarted soon after: nothing was missed, nothing runs.
    let mut c = Agent::start(
        &env,
        &["--schedules", sched],
        &[("DRCTL_NOW", "2026-01-03T12:10:00Z")],
    );
    std::thread::sleep(Duration::from_secs(3));
    c.sigterm();
    assert_eq!(c.wait(Duration::from_secs(30)), 0, "{}", c.log());
    assert_eq!(history(&env, "nightly").len(), 2, "{}", c.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_schedules_fail_at_load_naming_the_job() {
    let tc = common::cluster("");
    let env = Env::new(&tc.cluster.endpoint(), RepoKind::Fs);
    let cases = [
        (
            "[[job]]\nname = \"nightly\"\ncron = \"0 0 25 * * *\"\nrun = [\"verify\"]\n",
            "invalid cron",
        ),
        (
            "[[job]]\nname = \"nightly\"\ncron = \"0 0 2 * * *\"\nrun = [\"reboot\"]\n",
            "unknown subcommand",
        ),
        (
            "[[job]]\nname = \"nightly\"\ncron = \"0 0 2 * * *\"\nrun = [\"drill\", \"--plan\", \"/nowhere/drill.toml\"]\n",
            "does not exist",
        ),
        (
            "[[job]]\nname = \"nightly\"\ncron = \"0 0 2 * * *\"\nrun = [\"verify\"]\ncolour = \"red\"\n",
            "colour",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let dir = env.dir.path().join(format!("bad{i}"));
        write(&dir, "jobs.toml", text);
        let out = env.drctl(&["agent", "--schedules", dir.to_str().unwrap(), "--check"]);
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "want {want:?}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("jobs.toml"), "{}", stderr(&out));
        if *want != "colour" {
            assert!(stderr(&out).contains("job \"nightly\""), "{}", stderr(&out));
        }
    }
    // The shipped schedule loads (plan paths relative to the project root).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drctl"))
        .current_dir(shipped)
        .args(["--config"])
        .arg(&env.config_path)
        .args(["--json", "agent", "--schedules", "schedules", "--check"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 6);
    // A taken --listen port is an error before anything runs.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = env.dir.path().join("good");
    write(
        &dir,
        "jobs.toml",
        "[[job]]\nname = \"l\"\ncron = \"0 0 2 * * *\"\nrun = [\"list\"]\n",
    );
    let out = env.drctl(&[
        "agent",
        "--schedules",
        dir.to_str().unwrap(),
        "--listen",
        &addr,
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("--listen"), "{}", stderr(&out));
}
