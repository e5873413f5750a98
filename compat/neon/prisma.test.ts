// Prisma Client with @prisma/adapter-neon (WebSocket) through sluice-pooler: CRUD, an
// interactive transaction, one rolled back, and a batch transaction. Run by
// pooler/tests/neon.rs, which creates the "Item" table and sets SLUICE_HTTP and
// DATABASE_URL.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import ws from 'ws'
import { neonConfig } from '@neondatabase/serverless'
import { PrismaNeon } from '@prisma/adapter-neon'
import { PrismaClient } from './generated/prisma/client.ts'

const front = process.env.SLUICE_HTTP!
const connectionString = process.env.DATABASE_URL!
neonConfig.webSocketConstructor = ws
neonConfig.useSecureWebSocket = false
neonConfig.wsProxy = (host, port) => `${front}/v2?address=${host}:${port}`

const prisma = new PrismaClient({ adapter: new PrismaNeon({ connectionString }) })

test('CRUD', async () => {
  await prisma.item.deleteMany({})
  const a = await prisma.item.create({ data: { name: 'alpha' } })
  assert.equal(a.name, 'alpha')
  const found = await prisma.item.findMany({ where: { name: 'alpha' } })
  assert.deepEqual(found.map((i) => i.id), [a.id])
  const b = await prisma.item.update({ where: { id: a.id }, data: { name: 'beta' } })
  assert.equal(b.name, 'beta')
  const many = await prisma.item.updateMany({ where: { name: 'beta' }, data: { name: 'gamma' } })
  assert.equal(many.count, 1)
  const gone = await prisma.item.deleteMany({ where: { name: 'gamma' } })
  assert.equal(gone.count, 1)
})

test('an interactive transaction commits, and one that throws rolls back', async () => {
  const r = await prisma.$transaction(
    async (tx) => {
      await tx.item.create({ data: { name: 'tx-a' } })
      return tx.item.count({ where: { name: 'tx-a' } })
    },
    { isolationLevel: 'Serializable' },
  )
  assert.equal(r, 1)
  await assert.rejects(
    prisma.$transaction(async (tx) => {
      await tx.item.create({ data: { name: 'tx-rolled-back' } })
      throw new Error('boom')
    }),
    /boom/,
  )
  assert.equal(await prisma.item.count({ where: { name: 'tx-rolled-back' } }), 0)
})

test('a batch transaction and a raw query', async () => {
  const [n, first] = await prisma.$transaction([
    prisma.item.count(),
    prisma.item.findFirst({ orderBy: { id: 'asc' } }),
  ])
  assert.equal(n, 1)
  assert.equal(first?.name, 'tx-a')
  const rows = await prisma.$queryRaw<{ one: number }[]>`select ${1}::int as one`
  assert.equal(rows[0].one, 1)
})

test.after(async () => {
  await prisma.$disconnect()
})
