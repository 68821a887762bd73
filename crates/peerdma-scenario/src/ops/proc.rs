//! Process and time ops: `fork`, `wait`, `exit`, `sleep`.
//!
//! `fork` creates a named process (its threads, declared with `process = CHILD`, start then) that inherits
//! the parent's named mappings; `wait` blocks until a child has exited; `exit` ends the process (the runner
//! then stops the thread and tears the address space down); `sleep` advances the thread's simulated time.

use peerdma_core::SimDuration;
use toml::de::DeValue;

use super::{Op, OpSpec};
use crate::ast::SleepSpec;
use crate::error::{RunError, ScenarioError};
use crate::parse::{Parser, RefKind, Table, describe};
use crate::run::{StepCx, StepResult};

type Result<T> = std::result::Result<T, ScenarioError>;

/// `fork`.
pub(crate) const FORK: OpSpec = OpSpec {
    name: "fork",
    keys: &["child"],
    expect_keys: &["errno"],
    doc_keys: "`child` (process name)",
    doc: "`fork(2)`; the child process's threads start; it inherits the mapping names and the open device files (an inherited `fd` still mirrors the opener's address space)",
    parse: |p, t| {
        let child_v = p.required(t, "child")?;
        let child = p.name(child_v, "child")?;
        p.define_process(&child, child_v.span())?;
        p.children.insert(child.clone());
        Ok(Op::Proc(ProcOp::Fork { child }))
    },
};

/// `wait`.
pub(crate) const WAIT: OpSpec = OpSpec {
    name: "wait",
    keys: &["child"],
    expect_keys: &["errno"],
    doc_keys: "`child`",
    doc: "wait for the child process to exit (all its threads finished, or `exit`)",
    parse: |p, t| {
        Ok(Op::Proc(ProcOp::Wait {
            child: p.name_ref(p.required(t, "child")?, "child", RefKind::Child)?,
        }))
    },
};

/// `exit`.
pub(crate) const EXIT: OpSpec = OpSpec {
    name: "exit",
    keys: &[],
    expect_keys: &["errno"],
    doc_keys: "—",
    doc: "the process exits (its address space is torn down)",
    parse: |_, _| Ok(Op::Proc(ProcOp::Exit)),
};

/// `sleep`.
pub(crate) const SLEEP: OpSpec = OpSpec {
    name: "sleep",
    keys: &["for", "random"],
    expect_keys: &["errno"],
    doc_keys: "`for` (time) or `random = [MIN, MAX]` (times)",
    doc: "the thread sleeps in simulated time",
    parse: |p, t| Ok(Op::Proc(ProcOp::Sleep(sleep(p, t)?))),
};

/// The process and time ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcOp {
    /// `fork(2)`: creates process `child`, whose threads then start.
    Fork {
        /// The new process's name (unique among processes).
        child: String,
    },
    /// Waits for a child process to exit.
    Wait {
        /// The child's name (created by some `fork` step).
        child: String,
    },
    /// The process exits.
    Exit,
    /// The thread sleeps in simulated time.
    Sleep(SleepSpec),
}

fn sleep(p: &Parser<'_>, t: &Table<'_, '_>) -> Result<SleepSpec> {
    match (t.get("for"), t.get("random")) {
        (Some(v), None) => Ok(SleepSpec::Fixed(p.time(v, "for")?)),
        (None, Some(v)) => {
            let pair = match v.get_ref() {
                DeValue::Array(items) if items.len() == 2 => {
                    Some((p.time(&items[0], "random")?, p.time(&items[1], "random")?))
                }
                _ => None,
            };
            let Some((min, max)) = pair else {
                return Err(p.err(
                    &v.span(),
                    format!(
                        "expected `random = [MIN, MAX]` (two times), found {}",
                        describe(v.get_ref())
                    ),
                ));
            };
            if min > max {
                return Err(p.err(
                    &v.span(),
                    format!("expected MIN <= MAX in `random`, found [{min}, {max}]"),
                ));
            }
            Ok(SleepSpec::Random(min, max))
        }
        _ => Err(p.err(
            &t.span,
            "a `sleep` step needs exactly one of `for = TIME` or `random = [MIN, MAX]`",
        )),
    }
}

impl ProcOp {
    /// Returns the op's name as written in `op = "..."`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Fork { .. } => FORK.name,
            Self::Wait { .. } => WAIT.name,
            Self::Exit => EXIT.name,
            Self::Sleep(_) => SLEEP.name,
        }
    }

    /// Runs the op.
    pub(crate) async fn run(
        &self,
        cx: &mut StepCx<'_>,
    ) -> std::result::Result<StepResult, RunError> {
        let (w, proc_name, pid) = (cx.world, cx.proc_name, cx.pid);
        let kernel = &w.kernel;
        let mut out = StepResult::default();
        match self {
            Self::Fork { child } => match kernel.fork(pid).await {
                Ok(cpid) => {
                    let (mappings, fds) = {
                        let procs = w.procs.borrow();
                        (
                            procs[proc_name].mappings.clone(),
                            procs[proc_name].fds.clone(),
                        )
                    };
                    let no_threads = {
                        let mut procs = w.procs.borrow_mut();
                        let st = procs.entry(child.clone()).or_default();
                        st.pid = Some(cpid);
                        st.mappings = mappings;
                        // Open files are inherited as file descriptors are (they still mirror the opener).
                        st.fds = fds;
                        st.live_threads == 0
                    };
                    w.proc_wq.wake_up_all();
                    if no_threads {
                        w.exit_process(child).await;
                    }
                }
                Err(e) => out.errno = Some(e),
            },
            Self::Wait { child } => {
                let procs = &w.procs;
                w.proc_wq
                    .wait_event(|| procs.borrow().get(child).is_some_and(|p| p.exited))
                    .await;
            }
            Self::Exit => w.exit_process(proc_name).await,
            Self::Sleep(s) => {
                let d = match s {
                    SleepSpec::Fixed(d) => *d,
                    SleepSpec::Random(lo, hi) => {
                        SimDuration(cx.rng.between(lo.as_nanos(), hi.as_nanos()))
                    }
                };
                kernel.sim.sleep(d).await;
            }
        }
        Ok(out)
    }
}
