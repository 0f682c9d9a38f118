//! The shipped systemd units (`systemd/`) and Prometheus alert rules (`scripts/prometheus/`):
//! `systemd-analyze verify` on copies that point at the built binary, the hardening and
//! schedules every unit must keep, the ExecStart command lines against drctl's own parser,
//! and `promtool check rules` / `promtool test rules`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the units expect the binary.
const EXEC: &str = "/usr/local/bin/drctl";
/// Every ExecStart begins like this.
const EXEC_PREFIX: &str = "/usr/local/bin/drctl --config /etc/drctl/drctl.toml --log-format json ";
/// Instances of the backup template.
const BACKUP_TYPES: [&str; 2] = ["physical", "logical"];

/// Hardening every service keeps (key, value).
const HARDENING: &[(&str, &str)] = &[
    ("User", "postgres"),
    ("Group", "postgres"),
    ("ProtectSystem", "strict"),
    ("NoNewPrivileges", "yes"),
    ("PrivateTmp", "yes"),
    ("ProtectHome", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("SystemCallArchitectures", "native"),
    ("UMask", "0077"),
    ("EnvironmentFile", "-/etc/drctl/drctl.env"),
];

/// Settings that break what the services run: RemoveIPC would remove the live server's shared
/// memory (same user); PostgreSQL's JIT needs W+X memory.
const FORBIDDEN: &[(&str, &str)] = &[("RemoveIPC", "yes"), ("MemoryDenyWriteExecute", "yes")];

/// Paths every service must be able to write (a leading `-` tolerates a missing one).
const WRITABLE: [&str; 3] = ["/var/lib/drctl", "/var/spool/drctl", "/var/lib/postgresql"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A unit file, as (section, key, value) in file order.
struct Unit {
    name: String,
    text: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn parse(name: &str, text: &str) -> Unit {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty()
                && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
            {
                continue;
            }
            if let Some(part) = line.strip_suffix('\\') {
                pending.push_str(part);
                pending.push(' ');
                continue;
            }
            let full = format!("{pending}{line}");
            pending.clear();
            if let Some(s) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            let (k, v) = full
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: not a key=value line: {full:?}"));
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
        Unit {
            name: name.to_string(),
            text: text.to_string(),
            entries,
        }
    }

    fn all(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The effective value of a single-valued key (the last assignment).
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.all(section, key).last().copied()
    }

    fn must(&self, section: &str, key: &str) -> &str {
        self.get(section, key)
            .unwrap_or_else(|| panic!("{}: [{section}] {key}= is missing", self.name))
    }

    /// A list-valued key (After=, ReadWritePaths=, ...): all assignments, split on spaces.
    fn list(&self, section: &str, key: &str) -> Vec<&str> {
        self.all(section, key)
            .into_iter()
            .flat_map(|v| v.split_whitespace())
            .collect()
    }

    fn is_service(&self) -> bool {
        self.name.ends_with(".service")
    }
}

fn units() -> Vec<Unit> {
    let dir = root().join("systemd");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for n in &names {
        assert!(
            n.ends_with(".service") || n.ends_with(".timer"),
            "systemd/{n}: only .service and .timer units belong in systemd/"
        );
    }
    let units: Vec<Unit> = names
        .iter()
        .map(|n| Unit::parse(n, &std::fs::read_to_string(dir.join(n)).unwrap()))
        .collect();
    assert!(
        units.len() >= 9,
        "expected the agent, backup, verify, expire and drill units"
    );
    units
}

fn unit<'a>(units: &'a [Unit], name: &str) -> &'a Unit {
    units
        .iter()
        .find(|u| u.name == name)
        .unwrap_or_else(|| panic!("systemd/{name} is missing"))
}

/// Seconds in a systemd time span such as `15min`, `1h 30min`, `2d`.
fn span_seconds(s: &str) -> u64 {
    s.split_whitespace()
        .map(|tok| {
            let i = tok.find(|c: char| !c.is_ascii_digit()).unwrap_or(tok.len());
            let n: u64 = tok[..i]
                .parse()
                .unwrap_or_else(|_| panic!("time span {s:?}"));
            n * match &tok[i..] {
                "" | "s" | "sec" => 1,
                "m" | "min" => 60,
                "h" | "hr" => 3600,
                "d" => 86400,
                "w" => 7 * 86400,
                u => panic!("time span {s:?}: unit {u:?}"),
            }
        })
        .sum()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `systemd-analyze verify` on `names` (file names, or instance names of a template in `dir`).
/// Strict: a non-zero exit is an error, and so is any message that names one of the units or a
/// file in `dir`, since unknown keys, unparsable values and the like are only warnings.
fn analyze_verify(dir: &Path, names: &[String]) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(names.iter().map(|n| dir.join(n)))
        .current_dir(dir)
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_PAGER", "cat")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("systemd-analyze not found: install the Debian package `systemd` (.ci/run does)")
        }
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    };
    let stderr =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let dir_s = dir.display().to_string();
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains(&dir_s)
                || names.iter().any(|n| {
                    let stem = n.split(['@', '.']).next().unwrap_or(n);
                    l.contains(stem)
                })
        })
        .collect();
    if !out.status.success() || !about_ours.is_empty() {
        return Err(format!(
            "systemd-analyze verify {names:?} exited with {}:\n{stderr}",
            out.status
        ));
    }
    Ok(())
}

/// Copies of the units in a temp dir, with ExecStart pointing at the binary cargo built.
fn units_for_verify(units: &[Unit]) -> (tempfile::TempDir, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let exe = bin.join("drctl");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_drctl"), &exe).unwrap();
    let exe = exe.display().to_string();
    assert!(
        !exe.contains(char::is_whitespace),
        "temp dir path {exe:?} has whitespace; set TMPDIR"
    );
    let mut names = Vec::new();
    for u in units {
        let text = u.text.replace(EXEC, &exe);
        std::fs::write(tmp.path().join(&u.name), text).unwrap();
        names.push(u.name.clone());
    }
    // The template's instances, resolved through the template as systemd would.
    for t in BACKUP_TYPES {
        names.push(format!("drctl-backup@{t}.service"));
        names.push(format!("drctl-backup@{t}.timer"));
    }
    (tmp, names)
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let units = units();
    let (tmp, names) = units_for_verify(&units);
    if let Err(e) = analyze_verify(tmp.path(), &names) {
        panic!("{e}");
    }
}

#[test]
fn systemd_analyze_verify_rejects_broken_units() {
    // The same check as above must fail on units that are wrong, or it proves nothing.
    let exe = env!("CARGO_BIN_EXE_drctl");
    let cases = [
        (
            "broken-exec.service",
            "[Unit]\nDescription=x\n[Service]\nType=oneshot\nExecStart=relative/path --x\n"
                .to_string(),
            "relative/path",
        ),
        (
            "broken-key.service",
            format!(
                "[Unit]\nDescription=x\n[Service]\nType=oneshot\nExecStart={exe}\nProtectSytem=strict\n"
            ),
            "ProtectSytem",
        ),
        (
            "broken-calendar.timer",
            "[Unit]\nDescription=x\n[Timer]\nOnCalendar=monthly\nOnCalendar=every-full-moon\n"
                .to_string(),
            "every-full-moon",
        ),
    ];
    for (name, text, expect) in cases {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(name), text).unwrap();
        if name.ends_with(".timer") {
            let service = name.replace(".timer", ".service");
            std::fs::write(
                tmp.path().join(service),
                format!("[Unit]\nDescription=x\n[Service]\nType=oneshot\nExecStart={exe}\n"),
            )
            .unwrap();
        }
        match analyze_verify(tmp.path(), &[name.to_string()]) {
            Ok(()) => panic!("systemd-analyze verify accepted the broken {name}"),
            Err(e) => assert!(e.contains(expect), "{name}: expected {expect:?} in:\n{e}"),
        }
    }
}

#[test]
fn services_run_as_postgres_hardened() {
    let units = units();
    let services: Vec<&Unit> = units.iter().filter(|u| u.is_service()).collect();
    assert_eq!(services.len(), 5, "agent, backup@, verify, expire, drill");
    for u in &units {
        assert!(
            u.get("Unit", "Description").is_some_and(|d| !d.is_empty()),
            "{}: Description=",
            u.name
        );
        assert!(
            !u.all("Unit", "Documentation").is_empty(),
            "{}: Documentation=",
            u.name
        );
    }
    for u in services {
        for (key, want) in HARDENING {
            assert_eq!(
                u.get("Service", key),
                Some(*want),
                "{}: [Service] {key}= must be {want}",
                u.name
            );
        }
        for (key, bad) in FORBIDDEN {
            assert_ne!(u.get("Service", key), Some(*bad), "{}: {key}={bad}", u.name);
        }
        let rw: Vec<&str> = u
            .list("Service", "ReadWritePaths")
            .into_iter()
            .map(|p| p.trim_start_matches('-'))
            .collect();
        for p in WRITABLE {
            assert!(rw.contains(&p), "{}: ReadWritePaths= lacks {p}", u.name);
        }
        for env in u.all("Service", "Environment") {
            let up = env.to_ascii_uppercase();
            for secret in ["SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "PGPASS"] {
                assert!(
                    !up.contains(secret),
                    "{}: secrets belong in EnvironmentFile=, not Environment={env}",
                    u.name
                );
            }
        }
        let exec = u.all("Service", "ExecStart");
        assert_eq!(exec.len(), 1, "{}: one ExecStart=", u.name);
        assert!(
            exec[0].starts_with(EXEC_PREFIX),
            "{}: ExecStart= must start with {EXEC_PREFIX:?}, is {:?}",
            u.name,
            exec[0]
        );
    }
}

#[test]
fn agent_unit_runs_the_schedules_and_stops_gracefully() {
    let units = units();
    let a = unit(&units, "drctl-agent.service");
    assert!(
        matches!(a.must("Service", "Type"), "simple" | "exec"),
        "agent Type="
    );
    assert!(
        a.must("Service", "ExecStart")
            .ends_with(" agent --schedules /etc/drctl/schedules --listen 127.0.0.1:9187")
    );
    // Relative plan paths in the schedules resolve from here.
    assert_eq!(a.must("Service", "WorkingDirectory"), "/etc/drctl");
    assert_eq!(a.must("Service", "Restart"), "on-failure");
    assert!(span_seconds(a.must("Service", "RestartSec")) >= 1);
    assert_eq!(a.must("Service", "KillSignal"), "SIGTERM");
    // SIGTERM to the agent only; its jobs' children are its to stop.
    assert_eq!(a.must("Service", "KillMode"), "mixed");
    // Longer than the agent's own --stop-timeout (5m) plus a clean abort.
    assert!(span_seconds(a.must("Service", "TimeoutStopSec")) >= 10 * 60);
    for dep in ["network-online.target", "postgresql.service"] {
        assert!(a.list("Unit", "After").contains(&dep), "agent After={dep}");
        assert!(a.list("Unit", "Wants").contains(&dep), "agent Wants={dep}");
    }
    assert_eq!(a.must("Install", "WantedBy"), "multi-user.target");
}

#[test]
fn oneshot_services_and_their_timers() {
    let units = units();
    let expect = [
        ("drctl-backup@", "backup --type %i"),
        ("drctl-verify", "verify"),
        ("drctl-expire", "expire"),
        (
            "drctl-drill",
            "drill --plan /etc/drctl/restore-plans/drill.toml",
        ),
    ];
    for (stem, verb) in expect {
        let s = unit(&units, &format!("{stem}.service"));
        assert_eq!(s.must("Service", "Type"), "oneshot", "{}", s.name);
        let args = &s.must("Service", "ExecStart")[EXEC_PREFIX.len()..];
        assert!(
            args == verb || args.starts_with(&format!("{verb} --")),
            "{}: ExecStart runs {args:?}, expected {verb:?}",
            s.name
        );
        assert!(
            s.get("Install", "WantedBy").is_none(),
            "{}: started by its timer, not enabled itself",
            s.name
        );
        unit(&units, &format!("{stem}.timer"));
    }
    // Every timer activates a service shipped beside it (systemd-analyze does not check this).
    for t in units.iter().filter(|u| u.name.ends_with(".timer")) {
        let target = t
            .get("Timer", "Unit")
            .map(str::to_string)
            .unwrap_or_else(|| t.name.replace(".timer", ".service"));
        unit(&units, &target);
        assert!(
            !t.all("Timer", "OnCalendar").is_empty(),
            "{}: OnCalendar=",
            t.name
        );
        assert_eq!(t.get("Timer", "Persistent"), Some("true"), "{}", t.name);
        assert!(
            t.get("Timer", "RandomizedDelaySec").is_some(),
            "{}: RandomizedDelaySec=",
            t.name
        );
        assert_eq!(
            t.get("Install", "WantedBy"),
            Some("timers.target"),
            "{}",
            t.name
        );
    }
    let drill = unit(&units, "drctl-drill.timer");
    assert_eq!(drill.all("Timer", "OnCalendar"), ["monthly"]);
    assert_eq!(drill.must("Timer", "Persistent"), "true");
    assert!(span_seconds(drill.must("Timer", "RandomizedDelaySec")) > 0);
    assert!(
        span_seconds(unit(&units, "drctl-backup@.timer").must("Timer", "RandomizedDelaySec")) > 0
    );
}

#[test]
fn exec_start_lines_parse_with_drctl() {
    // Every ExecStart, with --help appended, must get past drctl's argument parser: the
    // subcommand and every flag exist and every value is accepted.
    let units = units();
    for u in units.iter().filter(|u| u.is_service()) {
        let exec = u.must("Service", "ExecStart");
        assert!(
            !exec.contains(['"', '\'', '$']),
            "{}: keep ExecStart plain",
            u.name
        );
        let instances: Vec<&str> = if u.name.contains("@.") {
            BACKUP_TYPES.to_vec()
        } else {
            vec![""]
        };
        for i in instances {
            let line = exec.replace("%i", i);
            assert!(
                !line.contains('%'),
                "{}: unexpected specifier in {line:?}",
                u.name
            );
            let argv: Vec<&str> = line.split_whitespace().skip(1).collect();
            let out = run(Command::new(env!("CARGO_BIN_EXE_drctl"))
                .args(&argv)
                .arg("--help")
                .env_remove("DRCTL_CONFIG_FILE"));
            assert!(
                out.status.success(),
                "{} ({line}): drctl rejects its arguments:\n{}",
                u.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The alert rules file as `- alert:` blocks, without promtool: names, labels, annotations.
#[test]
fn alert_rules_name_severity_and_runbook() {
    let text = std::fs::read_to_string(root().join("scripts/prometheus/drctl-alerts.yml")).unwrap();
    assert!(text.contains("- name: drctl\n"), "rule group `drctl`");
    let blocks: Vec<&str> = text.split("- alert: ").skip(1).collect();
    let names: Vec<&str> = blocks
        .iter()
        .map(|b| b.lines().next().unwrap().trim())
        .collect();
    for want in [
        "DrctlRPOViolated",
        "DrctlWalArchiveLagHigh",
        "DrctlPhysicalBackupStale",
        "DrctlLogicalBackupStale",
        "DrctlRTOViolatedOrUnproven",
        "DrctlDrillOverdue",
        "DrctlVerifyFailures",
        "DrctlJobFailing",
        "DrctlAgentDown",
        "DrctlAgentAbsent",
    ] {
        assert!(names.contains(&want), "alert {want} missing from {names:?}");
    }
    for (name, b) in names.iter().zip(&blocks) {
        assert!(b.contains("expr: "), "{name}: expr");
        assert!(
            b.contains("severity: critical") || b.contains("severity: warning"),
            "{name}: severity label"
        );
        assert!(b.contains("summary: "), "{name}: summary annotation");
        assert!(
            b.contains("description: "),
            "{name}: description annotation"
        );
        assert!(
            b.contains("`drctl ") || b.contains("`journalctl ") || b.contains("`systemctl "),
            "{name}: the description tells the operator what to run"
        );
    }
}

fn promtool(args: &[&str]) -> Option<Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(root().join("scripts/prometheus"))
        .output()
    {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run promtool: {e}"),
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(version) = promtool(&["--version"]) else {
        if std::env::var("DRCTL_SKIP_PROMTOOL").as_deref() == Ok("1") {
            eprintln!("promtool not found; alert rules not checked (DRCTL_SKIP_PROMTOOL=1)");
            return;
        }
        panic!(
            "promtool not found: install the Debian package `prometheus` (it ships \
             /usr/bin/promtool), or set DRCTL_SKIP_PROMTOOL=1 to skip this check"
        );
    };
    assert!(version.status.success());
    for args in [
        ["check", "rules", "drctl-alerts.yml"],
        ["test", "rules", "drctl-alerts.test.yml"],
    ] {
        let out = promtool(&args).unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And promtool does fail on a broken rule.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yml");
    std::fs::write(
        &bad,
        "groups:\n  - name: drctl\n    rules:\n      - alert: Broken\n        expr: rate(drctl_job_runs_total[1h] > 0\n",
    )
    .unwrap();
    let out = promtool(&["check", "rules", bad.to_str().unwrap()]).unwrap();
    assert!(!out.status.success(), "promtool accepted a broken rule");
}
