use std::{io, process::ExitCode};

use clap::Parser as _;
use dogslow::{
    agent,
    cli::{Cli, Command},
    probe_list,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Attach(args) => args
            .into_config()
            .map_err(anyhow::Error::from)
            .and_then(|config| agent::run(config, None).map_err(anyhow::Error::from)),
        Command::Run(args) => args
            .into_config()
            .map_err(anyhow::Error::from)
            .and_then(|(config, path)| agent::run(config, Some(path)).map_err(anyhow::Error::from)),
        Command::Probes(args) => probe_list::run(&args.into_config(), &mut io::stdout().lock())
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dogslow: error: {}", describe(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: most messages already embed
/// their source's text, some (from dependencies) do not.
fn describe(err: &anyhow::Error) -> String {
    let mut message = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}
