use std::process::ExitCode;

use clap::Parser as _;
use dogslow::{
    agent,
    cli::{Cli, Command},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Attach(args) => args
            .into_config()
            .map_err(anyhow::Error::from)
            .and_then(|config| agent::run(config).map_err(anyhow::Error::from)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dogslow: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
