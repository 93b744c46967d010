//! Prints the in-memory layout of the RPC request enum, for checking the observer's decoder.
use rusty_workers::rpc::RuntimeServiceRequest as R;
use rusty_workers::types::*;
fn dump(name: &str, r: &R) {
    let p = r as *const R as *const u64;
    let n = std::mem::size_of::<R>() / 8;
    let words: Vec<String> = (0..n)
        .map(|i| format!("{:x}", unsafe { *p.add(i) }))
        .collect();
    println!("{name}: {}", words.join(" "));
}
fn s(x: &str) -> String {
    let mut s = String::with_capacity(x.len() + 7);
    s.push_str(x);
    s
}
fn main() {
    println!(
        "size {} align {}",
        std::mem::size_of::<R>(),
        std::mem::align_of::<R>()
    );
    let st = s("STRING");
    let p = &st as *const String as *const u64;
    println!(
        "String words: {:x} {:x} {:x} (ptr {:p} len {} cap {})",
        unsafe { *p },
        unsafe { *p.add(1) },
        unsafe { *p.add(2) },
        st.as_ptr(),
        st.len(),
        st.capacity()
    );
    let cfg = WorkerConfiguration {
        executor: ExecutorConfiguration {
            max_ab_memory_mb: 1,
            max_time_ms: 2,
            max_io_concurrency: 3,
            max_io_per_request: 4,
        },
        fetch_service: "127.0.0.1:3000".parse().unwrap(),
        env: Default::default(),
        kv_namespaces: Default::default(),
    };
    dump("Id", &R::Id {});
    dump(
        "SpawnWorker",
        &R::SpawnWorker {
            appid: s("APPID"),
            configuration: cfg,
            bundle: vec![1, 2, 3],
        },
    );
    dump(
        "TerminateWorker",
        &R::TerminateWorker {
            handle: WorkerHandle { id: s("HANDLE") },
        },
    );
    dump("ListWorkers", &R::ListWorkers {});
    dump(
        "Fetch",
        &R::Fetch {
            handle: WorkerHandle { id: s("HANDLE") },
            req: RequestObject {
                url: s("URL"),
                method: s("GET"),
                ..Default::default()
            },
        },
    );
    dump("Load", &R::Load {});
}
