//! SIGKILL at each step of a subuid/subgid write (fail points); filled in below.
