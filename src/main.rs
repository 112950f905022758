//! The `sabot` command: `sabot run` runs the W2 keyed-window job on an embedded default.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sabot::driver::{
    self, CheckpointSettings, CheckpointStats, DriverConfig, Progress, RunOutcome, StateKind, TransportKind,
};
use sabot::fs_storage::LocalFsStorage;
use sabot_kernel::checkpoint::manifest::{find_latest, load, sweep_before, Manifest};
use sabot_kernel::dataflow::event_window::{FullWindowFunction, LatePolicy, WindowFunction, WindowKind};
use sabot_kernel::dataflow::sink::read_committed;
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::element::CheckpointId;
use sabot_kernel::workload;

/// The job (and sink) name of `sabot run --window …`, and its late records' side output.
const WINDOWS_JOB: &str = "windows";
const LATE_SINK: &str = "windows-late";

const USAGE: &str = "\
sabot: a deterministic stream-processing kernel

usage:
  sabot run [flags]     run the W2 keyed tumbling-window job (WORKLOADS.md) embedded in this process
  sabot coordinator [flags]
                        run W2 on workers in other processes: assign their subtasks, coordinate
                        checkpoints, restart every subtask from the latest checkpoint when a worker
                        fails, finish when the job is complete
  sabot worker [flags]  offer this process's nodes to a coordinator, attempt after attempt
  sabot query [flags]   ask a running coordinator for the live state of a key
  sabot help            show this message

flags of `sabot coordinator`:
  --listen ADDR         where workers register (default 127.0.0.1:7100)
  --workers N           workers each attempt waits for (default 1)
  --min-workers M       after a failure, go on with M or more workers if no replacement registered
                        within 2 s (default: N, always wait for replacements)
  --job NAME            w2 (default: the keyed tumbling window), w1 (filter and projection), w3
                        (per-key statistics in value, list, map, reducing and aggregating state;
                        one row per key at the end) or w2-aligned (W2 whose source splits read
                        at different speeds, aligned in one group with a 200 ms drift across
                        every worker process; its output is W2's, under output/w2-aligned)
  --records, --parallelism, --batch-size, --data-dir, --unaligned, --alignment-timeout-ms
                        as for `sabot run`
  --checkpoint-interval-ms N
                        as for `sabot run` (default 1000; a cluster always checkpoints)
  --secret-file FILE    the job's shared secret (or the environment variable SABOT_SECRET); never logged

flags of `sabot worker`:
  --coordinator ADDR    the coordinator to register with (default 127.0.0.1:7100)
  --listen ADDR         where this worker accepts its peer workers: one connection per pair of
                        workers carries all their nodes' channels (default 127.0.0.1:0: any free port)
  --nodes N             kernel nodes this worker runs, one per core (default: the number of cores)
  --data-dir DIR        as for `sabot run`; workers of one job share it (one machine)
  --state KIND          rocksdb (default) or heap
  --secret-file FILE    as for `sabot coordinator`

flags of `sabot query`:
  --coordinator ADDR    the coordinator of the job (default 127.0.0.1:7100)
  --operator NAME       the keyed operator (default tumbling-window)
  --key K               the key (an integer)
  --secret-file FILE    as for `sabot coordinator`
  It prints the key's open windows as the live state holds them: the effect of every record
  processed so far, including records whose output no checkpoint committed yet.

flags of `sabot query --checkpoint` (reads the latest completed checkpoint in a data directory;
no coordinator needed, the job may be running or stopped):
  --job NAME            the job (default w2)
  --data-dir DIR        as for `sabot run`
  --state NAME          the keyed state (its operator's declared name: count-sum for w2's
                        windows; count, sum, max, buckets, multiples for w3)
  --key K               the key (an integer)
  --namespace N         the namespace, an integer (w2: the window start); default none
  It prints the state's value for the key as the checkpoint holds it: committed state, behind
  the live state by the records processed since.

flags of `sabot run`:
  --records N           records to generate (default 20000000, the published W2 size)
  --parallelism P       parallel subtasks, one node per worker thread (default: the number of cores, at most 8)
  --data-dir DIR        storage root: state under DIR/state, output under DIR/output (default ./sabot-data)
  --state KIND          keyed state: rocksdb (default) or heap
  --transport KIND      between nodes: inproc (default) or tcp (loopback connections, wire format)
  --batch-size N        records per Arrow batch (default 4096)
  --checkpoint-interval-ms N
                        take a checkpoint every N ms and commit output exactly once (default 0: no
                        checkpoints; output is committed at the end). With checkpoints, a run in a
                        data directory that holds a completed checkpoint of the job resumes from it
                        (at any --parallelism: key groups and source splits move between subtasks)
  --stop-with-savepoint-after-ms N
                        with checkpoints: take a savepoint N ms after the start and stop when it is
                        complete; savepoints are kept until deleted
  --from-savepoint ID   start from savepoint (or checkpoint) ID in the data directory
  --unaligned           periodic checkpoints use unaligned barriers (savepoints stay aligned)
  --alignment-timeout-ms N
                        aligned barriers that wait longer than N ms switch to unaligned
  --window KIND         instead of W2's window operator: tumbling, sliding or session windows
                        on timers (job and output `windows`), counting and summing values
  --window-time event|processing
                        the windows' clock: the records' event time and watermarks (default), or
                        processing time when records arrive (no lateness, nothing late)
  --window-function sum|median|distinct
                        each window's result beside its count: the sum, kept incrementally
                        (default), or the lower median or number of distinct values, computed
                        by a full-window function over every value the window kept
  --window-size-ms N    tumbling and sliding windows' size (default 10000)
  --slide-ms N          sliding windows' slide (default half the size)
  --gap-ms N            session windows' gap (default 1000)
  --out-of-orderness-ms N
                        the watermark's bound (default 5000; the generator's disorder is < 2000,
                        so a smaller bound makes late records)
  --allowed-lateness-ms N
                        windows keep their state N ms past their end; late records within it
                        update the window and fire it again (default 0)
  --late drop|side-output
                        records later than that: dropped and counted (default), or written to
                        output/windows-late, committed exactly once like the output
  The summary counts late records: dropped, updating a window, sent to the side output.
";

#[derive(Debug)]
struct RunArgs {
    records: u64,
    parallelism: u16,
    data_dir: PathBuf,
    state: StateKind,
    batch_size: usize,
    checkpoint_interval_ms: u64,
    stop_with_savepoint_after_ms: Option<u64>,
    from_savepoint: Option<u64>,
    unaligned: bool,
    alignment_timeout_ms: Option<u64>,
    transport: TransportKind,
    /// `None`: W2 itself (the tumbling window operator of WORKLOADS.md).
    windows: Option<WindowKind>,
    processing_time: bool,
    window_function: WindowFunction,
    allowed_lateness_ms: i64,
    late_side_output: bool,
    out_of_orderness_ms: i64,
}

/// A command-line mistake: printed with a pointer to the usage, exit code 2.
#[derive(Debug)]
struct UsageError(String);

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, UsageError> {
    value.replace('_', "").parse().map_err(|_| UsageError(format!("{flag} takes a whole number, not {value:?}")))
}

fn parse_run(args: &[String]) -> Result<RunArgs, UsageError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) as u16;
    let mut run = RunArgs {
        records: workload::RECORD_COUNT_DEFAULT,
        parallelism: cores,
        data_dir: PathBuf::from("sabot-data"),
        state: StateKind::RocksDb,
        batch_size: 4096,
        checkpoint_interval_ms: 0,
        stop_with_savepoint_after_ms: None,
        from_savepoint: None,
        unaligned: false,
        alignment_timeout_ms: None,
        transport: TransportKind::InProcess,
        windows: None,
        processing_time: false,
        window_function: WindowFunction::CountSum,
        allowed_lateness_ms: 0,
        late_side_output: false,
        out_of_orderness_ms: workload::W2_OUT_OF_ORDERNESS_MS,
    };
    let (mut window, mut size_ms, mut slide_ms, mut gap_ms) = (None::<String>, None::<i64>, None::<i64>, None::<i64>);
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (flag.as_str(), None),
        };
        let mut value = || {
            inline.clone().or_else(|| iter.next().cloned()).ok_or_else(|| UsageError(format!("{flag} needs a value")))
        };
        match flag {
            "--records" => run.records = parse_number(flag, &value()?)?,
            "--parallelism" => run.parallelism = parse_number(flag, &value()?)?,
            "--batch-size" => run.batch_size = parse_number(flag, &value()?)?,
            "--checkpoint-interval-ms" => run.checkpoint_interval_ms = parse_number(flag, &value()?)?,
            "--stop-with-savepoint-after-ms" => run.stop_with_savepoint_after_ms = Some(parse_number(flag, &value()?)?),
            "--from-savepoint" => run.from_savepoint = Some(parse_number(flag, &value()?)?),
            "--unaligned" => run.unaligned = true,
            "--alignment-timeout-ms" => run.alignment_timeout_ms = Some(parse_number(flag, &value()?)?),
            "--data-dir" => run.data_dir = PathBuf::from(value()?),
            "--window" => window = Some(value()?),
            "--window-size-ms" => size_ms = Some(parse_number(flag, &value()?)?),
            "--slide-ms" => slide_ms = Some(parse_number(flag, &value()?)?),
            "--gap-ms" => gap_ms = Some(parse_number(flag, &value()?)?),
            "--window-time" => {
                run.processing_time = match value()?.as_str() {
                    "event" => false,
                    "processing" => true,
                    other => return Err(UsageError(format!("--window-time is event or processing, not {other:?}"))),
                }
            }
            "--window-function" => {
                run.window_function = match value()?.as_str() {
                    "sum" => WindowFunction::CountSum,
                    "median" => WindowFunction::Full(FullWindowFunction::median()),
                    "distinct" => WindowFunction::Full(FullWindowFunction::distinct()),
                    other => {
                        return Err(UsageError(format!("--window-function is sum, median or distinct, not {other:?}")))
                    }
                }
            }
            "--allowed-lateness-ms" => run.allowed_lateness_ms = parse_number(flag, &value()?)?,
            "--out-of-orderness-ms" => run.out_of_orderness_ms = parse_number(flag, &value()?)?,
            "--late" => {
                run.late_side_output = match value()?.as_str() {
                    "drop" => false,
                    "side-output" => true,
                    other => return Err(UsageError(format!("--late is drop or side-output, not {other:?}"))),
                }
            }
            "--transport" => {
                run.transport = match value()?.as_str() {
                    "inproc" => TransportKind::InProcess,
                    "tcp" => TransportKind::TcpLoopback,
                    other => return Err(UsageError(format!("--transport is inproc or tcp, not {other:?}"))),
                }
            }
            "--state" => {
                run.state = match value()?.as_str() {
                    "rocksdb" => StateKind::RocksDb,
                    "heap" => StateKind::Heap,
                    other => return Err(UsageError(format!("--state is rocksdb or heap, not {other:?}"))),
                }
            }
            other => return Err(UsageError(format!("unknown flag {other:?} for `sabot run`"))),
        }
    }
    let size = size_ms.unwrap_or(workload::W2_WINDOW_SIZE_MS);
    run.windows = match window.as_deref() {
        None if slide_ms.is_some() || gap_ms.is_some() || size_ms.is_some() => {
            return Err(UsageError("--window-size-ms, --slide-ms and --gap-ms go with --window".into()))
        }
        None => None,
        Some("tumbling") => Some(WindowKind::Tumbling { size_ms: size }),
        Some("sliding") => Some(WindowKind::Sliding { size_ms: size, slide_ms: slide_ms.unwrap_or(size / 2) }),
        Some("session") => Some(WindowKind::Session { gap_ms: gap_ms.unwrap_or(1_000) }),
        Some(other) => return Err(UsageError(format!("--window is tumbling, sliding or session, not {other:?}"))),
    };
    if let Some(kind) = run.windows {
        kind.validate().map_err(UsageError)?;
    }
    if run.processing_time && (run.allowed_lateness_ms != 0 || run.late_side_output) {
        return Err(UsageError(
            "processing-time windows have no late records: --allowed-lateness-ms and --late go with event time".into(),
        ));
    }
    let customized = run.allowed_lateness_ms != 0
        || run.late_side_output
        || run.processing_time
        || run.window_function != WindowFunction::CountSum
        || run.out_of_orderness_ms != workload::W2_OUT_OF_ORDERNESS_MS;
    if customized && run.windows.is_none() {
        return Err(UsageError(
            "--window-time, --window-function, --allowed-lateness-ms, --late and --out-of-orderness-ms go with \
             --window (W2 itself is fixed)"
                .into(),
        ));
    }
    if run.allowed_lateness_ms < 0 || run.out_of_orderness_ms < 0 {
        return Err(UsageError("--allowed-lateness-ms and --out-of-orderness-ms must not be negative".into()));
    }
    if run.parallelism == 0 {
        return Err(UsageError("--parallelism must be at least 1".into()));
    }
    if run.batch_size == 0 {
        return Err(UsageError("--batch-size must be at least 1".into()));
    }
    let needs_checkpoints = run.stop_with_savepoint_after_ms.is_some()
        || run.from_savepoint.is_some()
        || run.unaligned
        || run.alignment_timeout_ms.is_some();
    if run.checkpoint_interval_ms == 0 && needs_checkpoints {
        return Err(UsageError(
            "savepoints and alignment options need checkpoints: add --checkpoint-interval-ms".into(),
        ));
    }
    Ok(run)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") if args[1..].iter().any(|a| a == "--help" || a == "-h") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("run") => match parse_run(&args[1..]) {
            Ok(run_args) => run(run_args),
            Err(UsageError(message)) => return usage_error(&message),
        },
        Some("query") if args[1..].iter().any(|a| a == "--checkpoint") => match parse_checkpoint_query(&args[1..]) {
            Ok(query) => query_checkpoint(query),
            Err(UsageError(message)) => return usage_error(&message),
        },
        Some(command @ ("coordinator" | "worker" | "query")) => match cluster(command, &args[1..]) {
            Ok(result) => result,
            Err(UsageError(message)) => return usage_error(&message),
        },
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => return usage_error(&format!("unknown command {other:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sabot: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The job's secret: from `--secret-file`, else from `SABOT_SECRET`.
fn read_secret(file: Option<PathBuf>) -> Result<Vec<u8>, UsageError> {
    let secret = match file {
        Some(path) => std::fs::read(&path)
            .map_err(|error| UsageError(format!("--secret-file {}: {error}", path.display())))?
            .trim_ascii()
            .to_vec(),
        None => std::env::var("SABOT_SECRET")
            .map(String::into_bytes)
            .map_err(|_| UsageError("a cluster needs the job's secret: --secret-file FILE or SABOT_SECRET".into()))?,
    };
    if secret.is_empty() || secret.len() > sabot_kernel::wire::SECRET_SIZE_MAX {
        return Err(UsageError(format!("the secret must be 1 to {} bytes", sabot_kernel::wire::SECRET_SIZE_MAX)));
    }
    Ok(secret)
}

/// Parses and runs `sabot coordinator` or `sabot worker`.
fn cluster(command: &str, args: &[String]) -> Result<anyhow::Result<()>, UsageError> {
    use sabot::driver::cluster::{run_coordinator, run_worker, CoordinatorSettings, WorkerSettings};
    let address = |flag: &str, value: String| {
        value.parse::<std::net::SocketAddr>().map_err(|_| UsageError(format!("{flag} takes host:port, not {value:?}")))
    };
    let mut listen = None;
    let mut coordinator = address("--coordinator", "127.0.0.1:7100".into())?;
    let (mut workers, mut min_workers, mut secret_file) = (1_u16, None::<u16>, None);
    let mut job = sabot_kernel::wire::JobSpec {
        name: "w2".into(),
        records: workload::RECORD_COUNT_DEFAULT,
        parallelism: 2,
        batch_size: 4096,
    };
    let mut checkpoints =
        CheckpointSettings { interval_ms: 1000, retained_count: 3, unaligned: false, alignment_timeout_ms: None };
    let (mut data_dir, mut state) = (PathBuf::from("sabot-data"), StateKind::RocksDb);
    let mut nodes = std::thread::available_parallelism().map_or(1, |n| n.get().min(64) as u16);
    let (mut operator, mut key) = ("tumbling-window".to_string(), None::<u64>);
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (flag.as_str(), None),
        };
        let mut value = || {
            inline.clone().or_else(|| iter.next().cloned()).ok_or_else(|| UsageError(format!("{flag} needs a value")))
        };
        match (command, flag) {
            (_, "--listen") => listen = Some(address(flag, value()?)?),
            (_, "--data-dir") => data_dir = PathBuf::from(value()?),
            (_, "--secret-file") => secret_file = Some(PathBuf::from(value()?)),
            ("coordinator", "--workers") => workers = parse_number(flag, &value()?)?,
            ("coordinator", "--min-workers") => min_workers = Some(parse_number(flag, &value()?)?),
            ("coordinator", "--records") => job.records = parse_number(flag, &value()?)?,
            ("coordinator", "--job") => {
                job.name = match value()?.as_str() {
                    name @ ("w1" | "w2" | "w2-aligned" | "w3") => name.to_string(),
                    other => return Err(UsageError(format!("--job is w1, w2, w2-aligned or w3, not {other:?}"))),
                }
            }
            ("coordinator", "--parallelism") => job.parallelism = parse_number(flag, &value()?)?,
            ("coordinator", "--batch-size") => job.batch_size = parse_number(flag, &value()?)?,
            ("coordinator", "--checkpoint-interval-ms") => checkpoints.interval_ms = parse_number(flag, &value()?)?,
            ("coordinator", "--unaligned") => checkpoints.unaligned = true,
            ("coordinator", "--alignment-timeout-ms") => {
                checkpoints.alignment_timeout_ms = Some(parse_number(flag, &value()?)?)
            }
            ("worker" | "query", "--coordinator") => coordinator = address(flag, value()?)?,
            ("worker", "--nodes") => nodes = parse_number(flag, &value()?)?,
            ("query", "--operator") => operator = value()?,
            ("query", "--key") => {
                let text = value()?;
                let parsed = match text.strip_prefix('-') {
                    Some(_) => text.parse::<i64>().map(|k| k as u64).ok(),
                    None => text.parse::<u64>().ok(),
                };
                key = Some(parsed.ok_or_else(|| UsageError(format!("--key takes an integer, not {text:?}")))?);
            }
            ("worker", "--state") => {
                state = match value()?.as_str() {
                    "rocksdb" => StateKind::RocksDb,
                    "heap" => StateKind::Heap,
                    other => return Err(UsageError(format!("--state is rocksdb or heap, not {other:?}"))),
                }
            }
            (_, other) => return Err(UsageError(format!("unknown flag {other:?} for `sabot {command}`"))),
        }
    }
    if workers == 0 || nodes == 0 || job.parallelism == 0 || job.batch_size == 0 || checkpoints.interval_ms == 0 {
        return Err(UsageError(
            "--workers, --nodes, --parallelism, --batch-size and --checkpoint-interval-ms must be at least 1".into(),
        ));
    }
    if command == "query" && key.is_none() {
        return Err(UsageError("`sabot query` needs --key".into()));
    }
    let secret = read_secret(secret_file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => return Ok(Err(error).context("starting the runtime")),
    };
    Ok(match command {
        "coordinator" => {
            let listen = listen.unwrap_or(coordinator);
            let min_workers = min_workers.unwrap_or(workers).clamp(1, workers);
            let settings = CoordinatorSettings { listen, workers, min_workers, job, data_dir, checkpoints, secret };
            runtime.block_on(run_coordinator(settings)).context("coordinating the job")
        }
        "worker" => {
            let listen = listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("an address"));
            let settings = WorkerSettings { coordinator, listen, nodes, data_dir, state, secret };
            runtime.block_on(run_worker(settings)).context("running the worker")
        }
        _ => {
            let key = key.expect("checked above");
            let answer = runtime.block_on(sabot::driver::cluster::query(coordinator, &secret, &operator, key));
            answer.context("querying the coordinator").map(|batches| print_rows(&batches))
        }
    })
}

/// What `sabot query --checkpoint` asks.
struct CheckpointQuery {
    job: String,
    data_dir: PathBuf,
    state: String,
    key: u64,
    namespace: Option<i64>,
}

fn parse_checkpoint_query(args: &[String]) -> Result<CheckpointQuery, UsageError> {
    let mut query = CheckpointQuery {
        job: "w2".into(),
        data_dir: PathBuf::from("sabot-data"),
        state: String::new(),
        key: 0,
        namespace: None,
    };
    let (mut state, mut key) = (None, None);
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().cloned().ok_or_else(|| UsageError(format!("{flag} needs a value")));
        match flag.as_str() {
            "--checkpoint" => {}
            "--job" => query.job = value()?,
            "--data-dir" => query.data_dir = PathBuf::from(value()?),
            "--state" => state = Some(value()?),
            "--key" => {
                let text = value()?;
                let parsed = match text.strip_prefix('-') {
                    Some(_) => text.parse::<i64>().map(|k| k as u64).ok(),
                    None => text.parse::<u64>().ok(),
                };
                key = Some(parsed.ok_or_else(|| UsageError(format!("--key takes an integer, not {text:?}")))?);
            }
            "--namespace" => {
                let text = value()?;
                let parsed =
                    text.parse().map_err(|_| UsageError(format!("--namespace takes an integer, not {text:?}")))?;
                query.namespace = Some(parsed);
            }
            other => return Err(UsageError(format!("unknown flag {other:?} for `sabot query --checkpoint`"))),
        }
    }
    query.state = state.ok_or_else(|| UsageError("`sabot query --checkpoint` needs --state".into()))?;
    query.key = key.ok_or_else(|| UsageError("`sabot query --checkpoint` needs --key".into()))?;
    Ok(query)
}

/// Answers a query from the latest completed checkpoint: loads the key's group from the files of
/// the operator that declares the state, into a heap backend (portable files) or a scratch
/// RocksDB database (native checkpoints).
fn query_checkpoint(query: CheckpointQuery) -> anyhow::Result<()> {
    use sabot_kernel::env::Storage as _;
    use sabot_kernel::key_group::MaxParallelism;
    use sabot_kernel::state::keyed::{decode_descriptors, query_snapshot_with, Queried, QueryKey, TtlTimes};
    use sabot_kernel::state::{codec, map_key, order_preserving_i64, StateBackend};
    let mut storage = LocalFsStorage::open(&query.data_dir).context("opening the data directory")?;
    let recovery = find_latest(&mut storage, &query.job).context("looking for the latest checkpoint")?;
    let manifest = recovery.manifest.with_context(|| {
        format!("{} holds no completed checkpoint of job {:?}", query.data_dir.display(), query.job)
    })?;
    let max_parallelism = MaxParallelism::new(manifest.max_parallelism).context("the manifest's max parallelism")?;
    // The operator: the subtasks whose descriptors declare the state.
    let mut files = Vec::new();
    let mut declared = None;
    for task in &manifest.tasks {
        for file in task.files.iter().filter(|file| file.ends_with(".descriptors")) {
            let bytes = storage.read(file).with_context(|| format!("reading {file}"))?;
            let states = decode_descriptors(&bytes).map_err(|error| error.in_file(file))?;
            if let Some(state) = states.into_iter().find(|state| state.name == query.state) {
                declared = Some(state);
                files.extend(task.files.iter().cloned());
            }
        }
    }
    let state = declared.with_context(|| {
        format!("no operator of checkpoint {} declares a state named {:?}", manifest.checkpoint.0, query.state)
    })?;
    // RocksDB's checkpoints open in a scratch database beside the job's, removed afterwards.
    let scratch = query.data_dir.join(format!("query-scratch-{}", std::process::id()));
    let backend_for = |range| -> Result<Box<dyn StateBackend>, sabot_kernel::state::StateError> {
        if files.iter().any(|file| file.ends_with(sabot::rocks::NATIVE_EXTENSION)) {
            let backend = sabot::rocks::RocksDbBackend::open_empty(&scratch, range, 1024)?;
            Ok(Box::new(backend))
        } else {
            Ok(Box::new(sabot_kernel::state::HeapBackend::new(range)))
        }
    };
    let namespace = query.namespace.map(|n| order_preserving_i64(n).to_be_bytes().to_vec()).unwrap_or_default();
    let now = TtlTimes {
        processing_time: sabot_kernel::time::Instant(0),
        event_time: sabot_kernel::time::EventTime(i64::MIN),
    };
    let answer = query_snapshot_with(
        &mut storage,
        &files,
        max_parallelism,
        backend_for,
        &query.state,
        QueryKey::U64(query.key),
        &namespace,
        now,
    )
    .context("reading the checkpoint's state");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    let answer = answer?;
    let render = |bytes: &[u8]| codec::render(&state.value_type, bytes).map_err(anyhow::Error::from);
    let text = match answer {
        Queried::Absent => "absent".to_string(),
        Queried::Value(bytes) => render(&bytes)?,
        Queried::List(elements) => {
            let items: anyhow::Result<Vec<String>> = elements.iter().map(|element| render(element)).collect();
            format!("[{}]", items?.join(", "))
        }
        Queried::Map(entries) => {
            let key_type = state.key_type.as_deref().unwrap_or("bytes");
            let mut items = Vec::new();
            for (key, value) in &entries {
                items.push(format!("{}: {}", map_key::render(key_type, key)?, render(value)?));
            }
            format!("{{{}}}", items.join(", "))
        }
    };
    println!("{text}");
    let types = match &state.key_type {
        Some(key_type) => format!("{key_type} -> {}", state.value_type),
        None => state.value_type.clone(),
    };
    eprintln!(
        "state {:?} ({:?} state of {types}) of key {}, from completed checkpoint {} (committed state; entries \
         with TTL shown as if not expired)",
        state.name, state.kind, query.key as i64, manifest.checkpoint.0
    );
    Ok(())
}

/// Prints rows as a table, one line a row.
fn print_rows(batches: &[arrow_array::RecordBatch]) {
    let Some(first) = batches.first() else { return };
    let names: Vec<&str> = first.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
    println!("{}", names.join("\t"));
    let mut count = 0;
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .map(|column| {
                    use arrow_array::{Array, Int64Array, UInt64Array};
                    let any = column.as_any();
                    match (any.downcast_ref::<UInt64Array>(), any.downcast_ref::<Int64Array>()) {
                        (Some(values), _) => values.value(row).to_string(),
                        (_, Some(values)) => values.value(row).to_string(),
                        _ => format!("<{}>", column.data_type()),
                    }
                })
                .collect();
            println!("{}", cells.join("\t"));
            count += 1;
        }
    }
    eprintln!("{count} rows (live state: it includes records whose output is not committed yet)");
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("sabot: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

/// The latest usable checkpoint of `job` in the data directory; says on stderr what it skipped.
fn find_checkpoint(data_dir: &std::path::Path, job: &str) -> anyhow::Result<Option<Manifest>> {
    let mut storage = LocalFsStorage::open(data_dir).context("opening the data directory")?;
    let recovery = find_latest(&mut storage, job).context("looking for a checkpoint to resume from")?;
    if let Some(problem) = &recovery.pointer_problem {
        eprintln!("the latest-checkpoint pointer is unusable ({problem}); looking at every checkpoint");
    }
    for (checkpoint, reason) in &recovery.skipped {
        eprintln!("skipping checkpoint {}: it {reason}", checkpoint.0);
    }
    if let Some(manifest) = &recovery.manifest {
        eprintln!("resuming from checkpoint {} in {}", manifest.checkpoint.0, data_dir.display());
        let deleted = sweep_before(&mut storage, job, manifest).context("deleting older checkpoints")?;
        if !deleted.is_empty() {
            eprintln!(
                "deleted {} files of checkpoints older than {} that nothing names",
                deleted.len(),
                manifest.checkpoint.0
            );
        }
    }
    Ok(recovery.manifest)
}

/// The savepoint (or checkpoint) `id` of `job`, checked as recovery checks checkpoints.
fn load_savepoint(data_dir: &std::path::Path, job: &str, id: u64) -> anyhow::Result<Manifest> {
    let mut storage = LocalFsStorage::open(data_dir).context("opening the data directory")?;
    let manifest = load(&mut storage, job, CheckpointId(id))
        .map_err(|reason| anyhow::anyhow!("savepoint {id} in {} {reason}", data_dir.display()))?;
    eprintln!("starting from savepoint {id} in {}", data_dir.display());
    Ok(manifest)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let graph = match args.windows {
        None => workload::w2_job(args.records, args.parallelism, args.batch_size).context("building the W2 job")?,
        Some(kind) => {
            use sabot_kernel::dataflow::graph::{SourceSpec, Windows};
            let late = if args.late_side_output { LatePolicy::SideOutput(LATE_SINK.into()) } else { LatePolicy::Drop };
            let windows = Windows {
                kind,
                processing_time: args.processing_time,
                function: args.window_function.clone(),
                allowed_lateness_ms: args.allowed_lateness_ms,
                late,
            };
            let source = SourceSpec::Generator {
                record_count: args.records,
                batch_size: args.batch_size,
                keys: workload::Keys::Uniform,
                splits: Default::default(),
            };
            sabot_kernel::dataflow::JobBuilder::new(WINDOWS_JOB)
                .source("generator", source, args.parallelism)
                .and_then(|stream| stream.assign_watermarks(args.out_of_orderness_ms))
                .and_then(|stream| stream.key_by("key", args.parallelism))
                .and_then(|stream| stream.windows_with("value", windows))
                .and_then(|stream| stream.sink_files(WINDOWS_JOB))
                .context("building the windows job")?
        }
    };
    let plan = Arc::new(PhysicalPlan::new(graph, args.parallelism));
    let restore = match (args.from_savepoint, args.checkpoint_interval_ms > 0) {
        (Some(id), _) => Some(load_savepoint(&args.data_dir, &plan.graph.name, id)?),
        (None, true) => find_checkpoint(&args.data_dir, &plan.graph.name)?,
        (None, false) => None,
    };
    if restore.is_none() {
        for dir in driver::clear_previous(&args.data_dir, &plan.graph.name).context("clearing the previous run")? {
            eprintln!("removed the previous run's {}", dir.display());
        }
    }
    let state_name = match args.state {
        StateKind::RocksDb => format!("rocksdb under {}", args.data_dir.join("state").display()),
        StateKind::Heap => "heap (in memory)".to_string(),
    };
    let job = match args.windows {
        None => "W2 keyed tumbling window (10 s windows, 5 s out-of-orderness)".to_string(),
        Some(kind) if args.processing_time => {
            format!("keyed {kind:?} windows on processing time, result {}", args.window_function.result_name())
        }
        Some(kind) => format!(
            "keyed {kind:?} windows, result {}, {} ms out-of-orderness, {} ms allowed lateness, late records {}",
            args.window_function.result_name(),
            args.out_of_orderness_ms,
            args.allowed_lateness_ms,
            if args.late_side_output { "to output/windows-late" } else { "dropped (counted)" }
        ),
    };
    println!(
        "sabot run: {job}, {} records, parallelism {}, state {}",
        group_digits(args.records),
        args.parallelism,
        state_name
    );
    let checkpoints = (args.checkpoint_interval_ms > 0).then_some(CheckpointSettings {
        interval_ms: args.checkpoint_interval_ms,
        retained_count: 3,
        unaligned: args.unaligned,
        alignment_timeout_ms: args.alignment_timeout_ms,
    });
    let resumed_from = restore.as_ref().map(|manifest| manifest.checkpoint.0);
    let config = DriverConfig {
        data_dir: args.data_dir.clone(),
        state: args.state.clone(),
        checkpoints,
        restore,
        stop_with_savepoint_after_ms: args.stop_with_savepoint_after_ms,
        transport: args.transport,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.parallelism))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let progress = Progress::default();
    let stats = CheckpointStats::default();
    let started = Instant::now();
    let mut state_peak = 0_u64;
    let result = runtime.block_on(async {
        let job = tokio::spawn(driver::run(plan.clone(), config, progress.clone(), stats.clone()));
        tokio::pin!(job);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        loop {
            tokio::select! {
                biased;
                result = &mut job => return result,
                _ = ticker.tick() => {
                    let m = progress.total();
                    state_peak = state_peak.max(m.state_size_bytes);
                    let seconds = started.elapsed().as_secs_f64();
                    eprintln!(
                        "  {:>5.1} s  records {:>12} / {} ({:>3.0}%)  {:>6.2} M/s  windows out {:>12}  state {}",
                        seconds,
                        group_digits(m.records_in),
                        group_digits(args.records),
                        100.0 * m.records_in as f64 / args.records.max(1) as f64,
                        m.records_in as f64 / seconds / 1e6,
                        group_digits(m.records_out),
                        bytes(m.state_size_bytes),
                    );
                }
            }
        }
    });
    let elapsed = started.elapsed();
    let outcome = result.context("the job's driver task")?.context("running the job")?;
    if let RunOutcome::StoppedWithSavepoint(savepoint) = outcome {
        println!(
            "stopped with savepoint {} after {:.2} s; go on with: sabot run --checkpoint-interval-ms {} --from-savepoint {} --data-dir {} (any --parallelism)",
            savepoint.0,
            started.elapsed().as_secs_f64(),
            args.checkpoint_interval_ms,
            savepoint.0,
            args.data_dir.display()
        );
        return Ok(());
    }
    let metrics = progress.total();
    state_peak = state_peak.max(metrics.state_size_bytes);
    summarize(&args, metrics, elapsed, state_peak, stats.completed_aborted(), resumed_from)
}

fn summarize(
    args: &RunArgs,
    metrics: sabot_kernel::node::NodeMetrics,
    elapsed: Duration,
    state_peak: u64,
    checkpoints: (u64, u64),
    resumed_from: Option<u64>,
) -> anyhow::Result<()> {
    let mut storage = LocalFsStorage::open(&args.data_dir).context("opening the data directory")?;
    let sink = if args.windows.is_some() { WINDOWS_JOB } else { "w2" };
    let batches = read_committed(&mut storage, sink).context("reading the committed output")?;
    let (mut rows, mut count_sum, mut value_sum) = (0_u64, 0_u64, 0_i128);
    for batch in &batches {
        let counts = batch.column(3).as_any().downcast_ref::<arrow_array::UInt64Array>().context("count column")?;
        let sums = batch.column(4).as_any().downcast_ref::<arrow_array::Int64Array>().context("sum column")?;
        rows += batch.num_rows() as u64;
        count_sum += counts.values().iter().sum::<u64>();
        value_sum += sums.values().iter().map(|&s| i128::from(s)).sum::<i128>();
    }
    let seconds = elapsed.as_secs_f64();
    let output_dir = args.data_dir.join("output").join(sink);
    println!("summary");
    match resumed_from {
        Some(checkpoint) => println!(
            "  records in      {} (this run, resumed from checkpoint {checkpoint})",
            group_digits(metrics.records_in)
        ),
        None => println!("  records in      {}", group_digits(metrics.records_in)),
    }
    if args.checkpoint_interval_ms > 0 {
        println!(
            "  checkpoints     {} completed, {} aborted (every {} ms)",
            checkpoints.0, checkpoints.1, args.checkpoint_interval_ms
        );
        let mean = metrics.alignment_ms_total as f64 / metrics.alignment_count.max(1) as f64;
        println!(
            "  alignment       inputs held {mean:.1} ms on average, {} ms at most, over {} snapshots of windows",
            metrics.alignment_ms_max, metrics.alignment_count
        );
    }
    println!("  windows out     {} rows (one per key and window)", group_digits(metrics.records_out));
    println!(
        "  late records    {} dropped, {} updated a window within the allowed lateness, {} to the side output",
        group_digits(metrics.records_late_dropped),
        group_digits(metrics.records_late_updated),
        group_digits(metrics.records_late_side_output)
    );
    println!("  elapsed         {seconds:.2} s");
    println!("  throughput      {:.2} M records/s", metrics.records_in as f64 / seconds / 1e6);
    println!(
        "  state size      peak {} (sampled each second), {} at end",
        bytes(state_peak),
        bytes(metrics.state_size_bytes)
    );
    println!("  output          {} committed rows in {}", group_digits(rows), output_dir.display());
    println!("  checksums       count sum {}, value sum {}", group_digits(count_sum), group_digits_i128(value_sum));
    if resumed_from.is_none() {
        anyhow::ensure!(
            rows == metrics.records_out,
            "committed {rows} rows, but the sinks took {}",
            metrics.records_out
        );
    }
    if args.windows.is_some() {
        if args.late_side_output {
            let late = read_committed(&mut storage, LATE_SINK).context("reading the late records")?;
            let late_rows: usize = late.iter().map(|batch| batch.num_rows()).sum();
            println!(
                "  side output     {} late records committed in output/{LATE_SINK}",
                group_digits(late_rows as u64)
            );
        }
        // Sliding windows count a record in several windows, late firings re-emit a window.
        println!("  W2 reference    not for these windows; rows are per key and window firing");
        return Ok(());
    }
    // Every record of the input is counted in exactly one committed window, resumed or not.
    anyhow::ensure!(count_sum == args.records, "the window counts add up to {count_sum}, not {}", args.records);
    if args.records == workload::RECORD_COUNT_DEFAULT {
        let matches = rows == workload::W2_EXPECTED_ROWS
            && count_sum == workload::W2_EXPECTED_COUNT_SUM
            && value_sum == workload::W2_EXPECTED_SUM_SUM;
        anyhow::ensure!(matches, "the output does not match the published W2 checksums (WORKLOADS.md)");
        println!("  W2 reference    matches the published checksums (rows, count sum, value sum)");
    } else {
        println!("  W2 reference    published for 20,000,000 records only; counts checked against the input");
    }
    Ok(())
}

fn group_digits(value: u64) -> String {
    group_digits_i128(i128::from(value))
}

fn group_digits_i128(value: i128) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0 {
        out.insert(0, '-');
    }
    out
}

fn bytes(value: u64) -> String {
    match value {
        v if v >= 1 << 30 => format!("{:.1} GiB", v as f64 / (1u64 << 30) as f64),
        v if v >= 1 << 20 => format!("{:.1} MiB", v as f64 / (1u64 << 20) as f64),
        v if v >= 1 << 10 => format!("{:.1} KiB", v as f64 / 1024.0),
        v => format!("{v} B"),
    }
}
