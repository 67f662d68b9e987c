//! The generation queue: a bounded list of jobs and a pool of worker threads, each owning an
//! [`Engine`]. Handlers on the async runtime submit a job and await its answer; generation
//! never runs on the runtime's threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::pipeline::{Engine, GenerateRequest, Generated, LoraSpec, LoraSwitch, Progress, Task};

/// Why a job stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The client went away (its connection closed).
    ClientGone = 1,
    /// `POST /sdapi/v1/interrupt`.
    Interrupted = 2,
    /// The request ran past the server's `--timeout`.
    TimedOut = 3,
    /// The server is shutting down and the grace period ended.
    Shutdown = 4,
}

impl Stop {
    fn from_code(code: u8) -> Option<Stop> {
        match code {
            1 => Some(Stop::ClientGone),
            2 => Some(Stop::Interrupted),
            3 => Some(Stop::TimedOut),
            4 => Some(Stop::Shutdown),
            _ => None,
        }
    }
}

/// A job's stop flag, shared by the handler that waits for it and the worker that runs it.
#[derive(Debug, Default)]
pub struct StopFlag(AtomicU8);

impl StopFlag {
    /// Asks the job to stop for `why`; the first reason given wins.
    pub fn stop(&self, why: Stop) {
        let _ = self
            .0
            .compare_exchange(0, why as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why the job was asked to stop, if it was.
    pub fn stopped(&self) -> Option<Stop> {
        Stop::from_code(self.0.load(Ordering::SeqCst))
    }
}

/// What a job runs: generations one after the other (A1111's `n_iter`), with the same task
/// and LoRAs.
#[derive(Debug)]
pub struct Work {
    /// One request per iteration.
    pub runs: Vec<GenerateRequest>,
    /// The task every run does.
    pub task: Task,
    /// The LoRAs of this request, on top of the server's own.
    pub loras: Vec<LoraSpec>,
}

/// A job's successful answer.
#[derive(Debug)]
pub struct Done {
    /// One result per run.
    pub generated: Vec<Generated>,
    /// What switching to the request's LoRAs did.
    pub lora_switch: LoraSwitch,
}

/// A job's failure.
#[derive(Debug)]
pub enum Failed {
    /// The engine refused or failed.
    Engine(crate::Error),
    /// The job was stopped.
    Stopped(Stop),
}

type Reply = oneshot::Sender<Result<Done, Failed>>;

/// Where a job's answer arrives, and its stop flag.
pub type Submitted = (oneshot::Receiver<Result<Done, Failed>>, Arc<StopFlag>);

struct Job {
    work: Work,
    stop: Arc<StopFlag>,
    deadline: Instant,
    reply: Reply,
}

/// What `GET /sdapi/v1/progress` reports.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs running.
    pub running: usize,
    /// Denoising steps done and in all, of the run in progress (over every iteration of its
    /// job), on the worker that started last.
    pub step: usize,
    /// Steps in all.
    pub steps: usize,
    /// When the job in progress started.
    pub started: Option<Instant>,
    /// Jobs finished since the start.
    pub finished: u64,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    closed: bool,
    /// The stop flags of running jobs.
    running: Vec<Arc<StopFlag>>,
    progress: Snapshot,
}

/// Why a job was not accepted.
#[derive(Debug)]
pub enum Refused {
    /// The queue is full; try again after this long.
    Full(Duration),
    /// The server is shutting down.
    Closed,
}

/// The bounded queue and its workers.
pub struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// Mean seconds of a job, in milliseconds (for `Retry-After`).
    mean_ms: AtomicU64,
}

impl Queue {
    /// A queue of `capacity` waiting jobs, each answered within `timeout`.
    pub fn new(capacity: usize, timeout: Duration, metrics: Arc<Metrics>) -> Arc<Queue> {
        Arc::new(Queue {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            capacity,
            timeout,
            metrics,
            mean_ms: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-update leaves counters at worst; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `work`: the answer comes on the receiver; the flag stops it.
    pub fn submit(&self, work: Work) -> Result<Submitted, Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.jobs.len() >= self.capacity {
            let per_job = self.mean_ms.load(Ordering::Relaxed).max(1000);
            let ahead = (state.jobs.len() + state.running.len()) as u64;
            return Err(Refused::Full(Duration::from_millis(per_job * ahead.max(1))));
        }
        let (reply, receiver) = oneshot::channel();
        let stop = Arc::new(StopFlag::default());
        state.jobs.push_back(Job {
            work,
            stop: stop.clone(),
            deadline: Instant::now() + self.timeout,
            reply,
        });
        state.progress.queued = state.jobs.len();
        self.metrics.set_queue_depth(state.jobs.len());
        drop(state);
        self.ready.notify_one();
        Ok((receiver, stop))
    }

    /// The progress of the queue.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().progress.clone()
    }

    /// Stops the running jobs (`POST /sdapi/v1/interrupt`).
    pub fn interrupt(&self) {
        for flag in &self.lock().running {
            flag.stop(Stop::Interrupted);
        }
    }

    /// Refuses new jobs; the workers finish the queued ones and end.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Stops every queued and running job (the end of the shutdown grace period).
    pub fn stop_all(&self, why: Stop) {
        let state = self.lock();
        for flag in state.jobs.iter().map(|j| &j.stop).chain(&state.running) {
            flag.stop(why);
        }
    }

    fn next(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                state.running.push(job.stop.clone());
                state.progress.queued = state.jobs.len();
                state.progress.running = state.running.len();
                state.progress.started = Some(Instant::now());
                state.progress.step = 0;
                state.progress.steps = 0;
                self.metrics.set_queue_depth(state.jobs.len());
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finished(&self, stop: &Arc<StopFlag>, elapsed: Duration) {
        let mut state = self.lock();
        state.running.retain(|f| !Arc::ptr_eq(f, stop));
        state.progress.running = state.running.len();
        state.progress.finished += 1;
        if state.running.is_empty() {
            // Idle: nothing in progress (A1111 answers 0 between jobs).
            state.progress.started = None;
            state.progress.step = 0;
            state.progress.steps = 0;
        }
        let ms = elapsed.as_millis() as u64;
        let mean = self.mean_ms.load(Ordering::Relaxed);
        let mean = if mean == 0 { ms } else { (mean * 7 + ms) / 8 };
        self.mean_ms.store(mean, Ordering::Relaxed);
    }

    fn step(&self, done: usize, total: usize) {
        let mut state = self.lock();
        state.progress.step = done;
        state.progress.steps = total;
    }

    /// Starts a worker thread that owns `engine` until the queue is closed and empty.
    pub fn spawn_worker(
        self: &Arc<Self>,
        index: usize,
        mut engine: Engine,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let queue = self.clone();
        std::thread::Builder::new()
            .name(format!("tcd-ort-worker-{index}"))
            .spawn(move || {
                while let Some(job) = queue.next() {
                    let started = Instant::now();
                    let answer = queue.run(&mut engine, &job);
                    queue.finished(&job.stop, started.elapsed());
                    queue
                        .metrics
                        .record_job(&answer, started.elapsed(), &engine);
                    // The handler may have gone (client disconnected): nobody to tell.
                    let _ = job.reply.send(answer);
                }
            })
    }

    fn run(&self, engine: &mut Engine, job: &Job) -> Result<Done, Failed> {
        let check = |stop: &StopFlag| {
            if Instant::now() >= job.deadline {
                stop.stop(Stop::TimedOut);
            }
            stop.stopped()
        };
        if let Some(why) = check(&job.stop) {
            return Err(Failed::Stopped(why));
        }
        let lora_switch = engine.set_loras(&job.work.loras).map_err(Failed::Engine)?;
        let runs = job.work.runs.len();
        let mut generated = Vec::with_capacity(runs);
        for (k, request) in job.work.runs.iter().enumerate() {
            let steps = request.steps * runs;
            let result = engine.run(request, &job.work.task, &mut |event| {
                if let Progress::Step { step, .. } = event {
                    self.step(k * request.steps + step, steps);
                }
                check(&job.stop).is_none()
            });
            match result {
                Ok(g) => generated.push(g),
                Err(crate::Error::Cancelled) => {
                    return Err(Failed::Stopped(
                        job.stop.stopped().unwrap_or(Stop::Shutdown),
                    ))
                }
                Err(e) => return Err(Failed::Engine(e)),
            }
        }
        Ok(Done {
            generated,
            lora_switch,
        })
    }
}

/// Stops its job when dropped before [`Ticket::done`]: a handler's future is dropped when its
/// client disconnects, and the worker then stops between steps.
pub struct Ticket(Option<Arc<StopFlag>>);

impl Ticket {
    /// Watches `flag`.
    pub fn new(flag: Arc<StopFlag>) -> Self {
        Ticket(Some(flag))
    }

    /// The answer arrived: nothing to stop.
    pub fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.stop(Stop::ClientGone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work() -> Work {
        Work {
            runs: vec![GenerateRequest::default()],
            task: Task::TextToImage,
            loras: Vec::new(),
        }
    }

    #[test]
    fn a_full_queue_refuses_with_a_wait_and_a_closed_one_for_good() {
        let queue = Queue::new(1, Duration::from_secs(5), Arc::new(Metrics::default()));
        let (_answer, flag) = queue.submit(work()).expect("room for one");
        match queue.submit(work()) {
            Err(Refused::Full(wait)) => assert!(wait >= Duration::from_secs(1), "{wait:?}"),
            other => panic!("expected a full queue, got {:?}", other.map(|_| ())),
        }
        assert_eq!(queue.snapshot().queued, 1);
        queue.stop_all(Stop::Shutdown);
        assert_eq!(flag.stopped(), Some(Stop::Shutdown));
        queue.close();
        assert!(matches!(queue.submit(work()), Err(Refused::Closed)));
    }

    #[test]
    fn the_first_reason_to_stop_wins_and_a_dropped_ticket_stops() {
        let flag = Arc::new(StopFlag::default());
        flag.stop(Stop::TimedOut);
        flag.stop(Stop::Interrupted);
        assert_eq!(flag.stopped(), Some(Stop::TimedOut));
        let watched = Arc::new(StopFlag::default());
        drop(Ticket::new(watched.clone()));
        assert_eq!(watched.stopped(), Some(Stop::ClientGone));
        let answered = Arc::new(StopFlag::default());
        Ticket::new(answered.clone()).done();
        assert_eq!(answered.stopped(), None);
    }
}
