use instastate::defstate;

defstate!(X: u64);

fn main() {}
