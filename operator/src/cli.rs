//! Command line: `sluice-operator crd [--write-all <repo-root>]` and `sluice-operator run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::api::{CRD_PATHS, crd_yaml};

/// Kubernetes operator for sluice-pooler.
#[derive(Debug, Parser)]
#[command(name = "sluice-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the ConnectionPool CRD as YAML.
    Crd {
        /// Write it to every place the repository keeps it, under this repository root.
        #[arg(long, value_name = "REPO_ROOT")]
        write_all: Option<PathBuf>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { write_all } => match crd(write_all) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-operator crd: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn crd(write_all: Option<PathBuf>) -> anyhow::Result<()> {
    let yaml = crd_yaml()?;
    match write_all {
        None => print!("{yaml}"),
        Some(root) => {
            for rel in CRD_PATHS {
                let path = root.join(rel);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, &yaml)?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
