//! Small helpers: sizes, /proc CPU accounting, a seeded PRNG, a tiny option parser.

use std::collections::VecDeque;

/// Parses `4096`, `4k`, `64K`, `1M`, `1G`, `1GiB`, `512b` (b = bytes) into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        Some('t') => (&lower[..lower.len() - 1], 1 << 40),
        _ => (lower, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?} (examples: 4096, 4k, 64k, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Formats bytes as the shortest exact `4k` / `64k` / `1M` / `512` form.
pub fn fmt_size(b: u64) -> String {
    for (suffix, shift) in [("G", 30), ("M", 20), ("k", 10)] {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{}{}", b >> shift, suffix);
        }
    }
    b.to_string()
}

/// utime + stime of a process in seconds (all threads), or `None` if it is gone or a zombie.
pub fn proc_cpu_secs(pid: Option<i32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts with field 3 (state); utime is field 14, stime field 15.
    if f.first() == Some(&"Z") || f.first() == Some(&"X") {
        return None;
    }
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// True if the process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    proc_cpu_secs(Some(pid)).is_some()
}

/// xorshift64: cheap, deterministic, good enough to pick offsets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed so that nearby seeds give unrelated streams; never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(z | 1)
    }

    #[inline]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-enough in [0, n) (n >= 1); uses the high bits.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// A minimal `--key value` / `--key=value` / `--flag` parser.
pub struct Args {
    rest: VecDeque<String>,
}

impl Args {
    pub fn new(v: Vec<String>) -> Args {
        Args { rest: v.into() }
    }

    /// Next option: returns (name without dashes, inline value if `--k=v`).
    pub fn next_opt(&mut self) -> Result<Option<(String, Option<String>)>, String> {
        let Some(a) = self.rest.pop_front() else {
            return Ok(None);
        };
        let Some(body) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument {a:?}"));
        };
        Ok(Some(match body.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        }))
    }

    pub fn value(&mut self, name: &str, inline: Option<String>) -> Result<String, String> {
        if let Some(v) = inline {
            return Ok(v);
        }
        self.rest
            .pop_front()
            .ok_or_else(|| format!("--{name} needs a value"))
    }
}

pub fn parse_num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("--{name}: invalid value {v:?}"))
}

/// Shell-quotes one word for a reproducible command line.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("512b").unwrap(), 512);
        assert!(parse_size("x").is_err());
        assert_eq!(fmt_size(4096), "4k");
        assert_eq!(fmt_size(1 << 30), "1G");
        assert_eq!(fmt_size(1000), "1000");
    }

    #[test]
    fn self_cpu() {
        assert!(proc_cpu_secs(None).is_some());
    }

    #[test]
    fn below_in_range() {
        let mut r = Rng::new(1);
        for _ in 0..10000 {
            assert!(r.below(7) < 7);
        }
    }
}
