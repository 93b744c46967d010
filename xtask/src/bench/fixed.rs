//! Load at a fixed rate (open loop, as wrk2 would; Debian has only wrk): latency without
//! coordinated omission, and the CPU each process spent meanwhile.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Sends `rate` requests per second for `seconds` over `conns` keep-alive connections, each
/// request at its scheduled time (or at once if late); a request's latency counts from its
/// scheduled time. Returns the latencies (ms), sorted, and the failures.
pub fn run(
    addr: SocketAddr,
    path: &str,
    rate: f64,
    seconds: f64,
    conns: usize,
) -> (Vec<f64>, usize) {
    let per_conn = rate / conns as f64;
    let start = Instant::now() + Duration::from_millis(50);
    let n = (per_conn * seconds) as usize;
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let path = path.to_string();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(n);
                let mut failed = 0;
                let Ok(stream) = TcpStream::connect(addr) else {
                    return (lat, n);
                };
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut w = stream.try_clone().expect("a second handle on the socket");
                let mut r = BufReader::new(stream);
                let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
                // Connections start staggered over one interval.
                let offset = Duration::from_secs_f64(c as f64 / rate);
                for i in 0..n {
                    let due = start + offset + Duration::from_secs_f64(i as f64 / per_conn);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if w.write_all(req.as_bytes()).is_err() || !read_response(&mut r) {
                        failed += n - i;
                        break;
                    }
                    lat.push(due.elapsed().as_secs_f64() * 1e3);
                }
                (lat, failed)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    for t in threads {
        let (l, f) = t.join().expect("load thread");
        all.extend(l);
        failed += f;
    }
    all.sort_by(f64::total_cmp);
    (all, failed)
}

/// Reads one HTTP/1.1 response with a Content-Length body; false on error or a non-200.
fn read_response(r: &mut BufReader<TcpStream>) -> bool {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 || !line.starts_with("HTTP/1.1 200") {
        return false;
    }
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).is_ok()
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds (user, system) of a process so far (`/proc/<pid>/stat`).
pub fn cpu(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tps = unsafe { sysconf(2) } as f64; // _SC_CLK_TCK
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / tps;
    // After the command: state is field 0; utime and stime are fields 11 and 12.
    (t(11), t(12))
}

extern "C" {
    fn sysconf(name: i32) -> i64;
}
