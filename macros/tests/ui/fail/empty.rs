use instastate::defstate;

defstate!();

fn main() {}
