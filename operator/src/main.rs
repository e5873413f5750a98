//! `sluice-operator`: `run` the controller or print the `crd`.

fn main() -> std::process::ExitCode {
    sluice_operator::main()
}
