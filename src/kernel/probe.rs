//! `ringfence probe`: what this kernel offers, for humans and for vm-tests.
use crate::kernel::dataplane::KernelInfo;

pub fn print() -> anyhow::Result<()> {
    let k = KernelInfo::probe();
    let cg = crate::job::cgroup::find_cgroup2().ok();
    let v = serde_json::json!({
        "kernel": k.release,
        "btf": k.btf,
        "tcx": k.tcx,
        "attach": if k.tcx { "tcx" } else { "clsact" },
        "cgroup2": cg.map(|p| p.display().to_string()),
        // Whether flows can name their process: TC programs may call the task helpers, or
        // the cgroup socket hooks that record socket owners load.
        "process_attribution": crate::kernel::dataplane::process_attribution(),
        "task_helpers_in_tc": crate::kernel::dataplane::task_helpers_in_tc(),
        "sock_owner_hooks": crate::kernel::dataplane::sock_owner_hooks(),
    });
    println!("{v}");
    Ok(())
}
