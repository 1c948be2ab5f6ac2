//! ferrodisk-loadgen: a libblkio load generator for vhost-user-blk backends (`run`) and the
//! Ferrodisk vs qemu-storage-daemon comparison runner (`compare`). See benches/README.md.

mod compare;
mod hist;
mod report;
mod run;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: ferrodisk-loadgen run --socket PATH [--rw MODE] [--bs SIZE] [--qd N] [--queues N]
                             [--duration SECS] [--ramp SECS] [--span SIZE] [--pid PID]
                             [--label STR] [--timeout SECS]
       ferrodisk-loadgen compare [--quick] [--backings LIST] [--workloads LIST] [--queues LIST]
                             [--rounds N] [--duration SECS] [--ramp SECS] [--idle SECS] ...
       ferrodisk-loadgen {run|compare} --help";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let sub = args.remove(0);
    if args.iter().any(|a| a == "--help" || a == "-h") {
        match sub.as_str() {
            "run" => println!("{}", run::RUN_USAGE),
            "compare" => println!("{}", compare::COMPARE_USAGE),
            _ => println!("{USAGE}"),
        }
        return ExitCode::SUCCESS;
    }
    match sub.as_str() {
        "run" => {
            let opts = match run::parse_opts(util::Args::new(args)) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match run::run(&opts) {
                Ok(rec) => {
                    println!("{}", rec.to_json());
                    if rec.errors > 0 {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("ferrodisk-loadgen run: {e}");
                    ExitCode::from(3)
                }
            }
        }
        "compare" => {
            let opts = match compare::parse_opts(args) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match compare::compare(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferrodisk-loadgen compare: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("unknown subcommand {sub:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
